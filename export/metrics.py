"""SDR in dB, the one way parity and precision are reported everywhere (exports, fp16 checks, tests, benchmarks).
numpy only: the fp16 converter and the runtime's checks use it without torch."""
from __future__ import annotations

import numpy as np


def sdr_db(ref, est) -> float:
    """10*log10(sum(ref^2) / sum((ref-est)^2)) over all elements, in float64: `inf` when identical, `-inf` when the
    reference is silent or the estimate is not finite."""
    ref = np.asarray(ref, dtype=np.float64)
    est = np.asarray(est, dtype=np.float64)
    if ref.shape != est.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {est.shape}")
    num = float(np.sum(ref * ref))
    den = float(np.sum((ref - est) ** 2))
    if not np.isfinite(den):
        return float("-inf")
    if den == 0.0:
        return float("inf")
    if num == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(num / den))
