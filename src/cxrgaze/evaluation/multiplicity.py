"""Multiple comparisons: Holm's step-down adjustment of a family of p-values.

Holm (1979), "A simple sequentially rejective multiple test procedure": with the m
p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted values are

    p~_(i) = min(1, max over j <= i of (m - j + 1) p_(j))

and rejecting every hypothesis with ``p~ <= alpha`` controls the family-wise error rate at
``alpha`` under any dependence between the tests. The running maximum makes the adjusted
values monotone in the raw ones (the "step-down" order).
"""

from __future__ import annotations

import numpy as np


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values of a family, in the input order.

    ``pvalues`` (m,) (any shape is flattened and restored). NaN entries are not part of the
    family: they stay NaN and do not count in m. Returns float64 of the input's shape,
    ``min(1, max_{j <= i} (m - j + 1) p_(j))`` for the i-th smallest p (see the module
    docstring); each adjusted value is >= its raw value, capped at 1, and the adjusted
    values keep the order of the raw ones."""
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.ravel()
    if ((flat < 0) | (flat > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(flat.shape, np.nan)
    present = np.flatnonzero(~np.isnan(flat))
    order = present[np.argsort(flat[present], kind="stable")]  # ascending
    m = order.size
    scaled = (m - np.arange(m)) * flat[order]  # (m - j + 1) p_(j), j = 1..m
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out.reshape(p.shape)
