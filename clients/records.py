"""NumPy arrays into Flower records on the client side."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """ArrayRecord from named NumPy arrays (order kept)."""
    return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()})
