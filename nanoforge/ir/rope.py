"""Rope-scaling formulas on plain numbers, shared by the models (YaRN's attention scale) and the
kernels (rotary frequencies, kernels/rope_math.py): neither has to import the other."""
from __future__ import annotations

import math


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
