"""Where to cut the scores: Otsu's threshold (with a floor on the isolated share), a quantile, or a fixed value.

Lower score = more robust = more suspicious: samples below the cut are *isolated*. `scan`
previews Otsu's cut in its histogram; `split` makes it.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.filters import threshold_otsu

METHODS = ("otsu", "quantile", "fixed")


def choose_isolated(scores: np.ndarray, *, method: str = "otsu", fraction: float | None = None,
                    threshold: float | None = None, min_isolated: float = 0.10) -> tuple[np.ndarray, float]:
    """Boolean mask of the isolated samples (True = suspicious) and the threshold used.

    otsu: score < Otsu threshold (256 bins), raised so at least `min_isolated` of the set is
    isolated; quantile: the `fraction` lowest scores; fixed: score < `threshold`.
    Ties at a rank cut are broken by dataset order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if method == "fixed":
        assert threshold is not None
        return scores < threshold, float(threshold)
    if method == "quantile":
        assert fraction is not None
        return _lowest(scores, round(fraction * n))
    isolated, t = _otsu(scores)
    floor = math.ceil(min_isolated * n - 1e-9)
    if isolated.sum() < floor:
        return _lowest(scores, floor)
    return isolated, t


# Otsu's threshold works on the scores as they are when their range is ordinary; past these
# bounds skimage's histogram and class variances overflow or cannot make 256 distinct bins.
_OTSU_SAFE_MAGNITUDE, _OTSU_SAFE_RELATIVE_RANGE = 1e100, 1e-9


def _otsu(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """Scores below Otsu's threshold (256 bins) and the threshold, for any finite scores."""
    lo, hi = float(scores.min()), float(scores.max())
    if lo == hi:
        return scores < lo, lo
    span = hi - lo
    magnitude = max(abs(lo), abs(hi))
    smallest_span = max(1 / _OTSU_SAFE_MAGNITUDE, magnitude * _OTSU_SAFE_RELATIVE_RANGE)
    if magnitude <= _OTSU_SAFE_MAGNITUDE and span >= smallest_span:
        # skimage returns the centre of the low group's last bin; its upper edge is the cut,
        # or samples in the top half of that bin would be kept.
        t = float(threshold_otsu(scores, nbins=256)) + span / 512
        return scores < t, t
    # Extreme ranges (1e308, subnormal gaps): cut the scores mapped onto [0, 1] (an order-keeping map,
    # halved first where hi - lo overflows), then report the cut between the two groups' scores.
    scaled = (scores - lo) / span if math.isfinite(span) else (scores / 2 - lo / 2) / (hi / 2 - lo / 2)
    below = scaled < float(threshold_otsu(scaled, nbins=256)) + 1 / 512
    return _lowest(scores, int(below.sum()))


def _lowest(scores: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    order = np.argsort(scores, kind="stable")
    isolated = np.zeros(len(scores), dtype=bool)
    isolated[order[:k]] = True
    if k <= 0:
        return isolated, float(scores[order[0]]) if len(scores) else 0.0
    if k >= len(scores):
        top = float(scores[order[-1]])
        above = math.nextafter(top, math.inf)
        return isolated, above if math.isfinite(above) else top
    a, b = float(scores[order[k - 1]]), float(scores[order[k]])
    middle = (a + b) / 2
    return isolated, middle if math.isfinite(middle) else a / 2 + b / 2
