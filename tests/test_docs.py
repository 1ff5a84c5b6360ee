"""The documentation site (mkdocs.yml, docs/) stays in step with README.md and the code.

`./run docs` (CI, after the tests) builds the site with ``mkdocs build --strict``, which fails
on a broken link or a missing API object. These checks are the cheap part of that, always
run, without mkdocs: README's links into docs/ resolve, every name in ``matspool.__all__`` has
its entry in the API reference (a new public name is documented, a removed one leaves no
stale entry), every page is in the nav, and the included files and sections exist.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import yaml

import matspool

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$', re.M)
_DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.M)


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs gives a heading as its anchor)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _without_code(text: str) -> str:
    """The text outside fenced code blocks (a ``# comment`` there is no heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return "\n".join(out)


def _included(path: str) -> str:
    """A snippet target: ``file``, ``file:SECTION`` or ``file:START:`` (pymdownx.snippets)."""
    name, _, rest = path.partition(":")
    target = REPO / name
    assert target.is_file(), f"included file {name} does not exist"
    text = target.read_text()
    if not rest:
        return text
    if rest[0].isdigit():
        return "\n".join(text.splitlines()[int(rest.split(":")[0]) - 1 :])
    start, end = f"--8<-- [start:{rest}]", f"--8<-- [end:{rest}]"
    assert start in text and end in text, f"{name} lost its section markers {start!r} / {end!r}"
    return text[text.index(start) : text.index(end)].split("\n", 1)[1]


def _page(path: Path) -> str:
    """A docs page as mkdocs sees it: its snippets included."""
    return _SNIPPET.sub(lambda m: _included(m.group(1)), path.read_text())


def _anchors(text: str) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+?)\s*$", _without_code(text), re.M)}


def _links(text: str) -> list[str]:
    return [u for u in _LINK.findall(_without_code(text)) if not re.match(r"[a-z]+:", u)]


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for v in nav.values() for f in _nav_files(v)]
    return []


def _check_link(source: Path, base: Path, url: str) -> str | None:
    file, _, anchor = url.partition("#")
    target = (base / file).resolve() if file else source
    if not target.exists():
        return f"{source.relative_to(REPO)}: link {url!r}: no {target}"
    if anchor and target.suffix == ".md":
        text = _page(target) if target.is_relative_to(DOCS) else target.read_text()
        if anchor not in _anchors(text):
            return f"{source.relative_to(REPO)}: link {url!r}: no heading #{anchor} in {file or 'itself'}"
    return None


def test_readme_links_into_the_docs_resolve() -> None:
    links = _links(README.read_text())
    into_docs = [u for u in links if u.startswith("docs/")]
    assert {"docs/getting-started.md", "docs/api.md", "docs/distributed.md", "docs/performance.md"} <= {
        u.partition("#")[0] for u in into_docs
    }
    broken = [e for u in links if (e := _check_link(README, REPO, u))]
    assert not broken, "\n".join(broken)


def test_readme_keeps_what_a_newcomer_needs() -> None:
    text = README.read_text()
    for heading in ("## Set-up: two commands", "## Distributed jobs", "## Performance"):
        assert re.search(rf"^{re.escape(heading)}\s*$", text, re.M), f"README lost {heading!r}"
    assert "./run demo" in text and "./run test" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("./run test") < ci.index("./run docs"), ".ci/run: the tests first, then the docs"


def test_every_public_name_is_in_the_api_reference() -> None:
    documented = _DIRECTIVE.findall((DOCS / "api.md").read_text())
    expected = {f"matspool.{name}" for name in matspool.__all__}
    missing = sorted(expected - set(documented))
    stale = sorted(set(documented) - expected)
    assert not missing, f"docs/api.md has no '::: NAME' entry for {missing}"
    assert not stale, f"docs/api.md documents names matspool no longer exports: {stale}"
    assert len(documented) == len(set(documented)), "docs/api.md documents a name twice"


def test_nav_lists_every_page_and_every_link_between_pages_resolves() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, "mkdocs.yml's nav and the pages in docs/ differ"
    plugins = [p for p in config["plugins"] if isinstance(p, dict)]
    (mkdocstrings,) = (p["mkdocstrings"] for p in plugins if "mkdocstrings" in p)
    assert mkdocstrings["handlers"]["python"]["paths"] == ["client", "service"]  # source, not the install
    broken = []
    for page in DOCS.rglob("*.md"):
        text = _page(page)  # a missing included file or section fails here
        broken += [e for u in _links(text) if (e := _check_link(page, page.parent, u))]
    assert not broken, "\n".join(broken)
