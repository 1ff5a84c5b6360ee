"""mkdocs hook: the Sphinx roles our docstrings use (``:class:`X```, ``:meth:`Spool.save```)
render as code, linked to the object's entry when the page has one.

mkdocstrings renders the docstrings as Markdown, where such a role would show as
``:class:X``; the docstrings keep the roles (they read well in ``help()`` and in editors).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|data|attr|exc|mod|obj):<code>~?([\w.]+)</code>")
_ID = re.compile(r'id="([\w.]+)"')


def on_page_content(html: str, **kwargs: Any) -> str:
    if ":<code>" not in html:
        return html
    ids = set(_ID.findall(html))

    def link(m: re.Match[str]) -> str:
        name = m.group(1)
        for anchor in (name, f"matspool.{name}"):
            if anchor in ids:
                return f'<a href="#{anchor}"><code>{name}</code></a>'
        return f"<code>{name}</code>"

    return _ROLE.sub(link, html)
