"""MAT v5 through scipy: the reference implementation of the format, so files are exact."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.io
from matspool._protocol import VarSpec

__all__ = ["write_v5"]


def write_v5(path: str, variables: Sequence[tuple[VarSpec, np.ndarray]]) -> None:
    # Arrays arrive with MATLAB's dims (never 1-d), so oned_as never applies here.
    with open(path, "xb") as f:
        scipy.io.savemat(f, {spec.name: arr for spec, arr in variables}, format="5",
                         do_compression=False, oned_as="row")
