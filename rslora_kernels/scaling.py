"""Adapter scaling factors: rank-stabilized (rsLoRA) and classic LoRA."""
import math

from ._validate import check_real

__all__ = ["rslora_scaling", "lora_scaling"]


def _check(alpha: float, r: int) -> float:
    """alpha as a float; a string, None or a tensor is a TypeError, not a silent ``float()``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    return check_real("alpha", alpha)


def rslora_scaling(alpha: float, r: int) -> float:
    """rsLoRA scaling ``alpha / sqrt(r)`` (arXiv 2312.03732): keeps learning stable as r grows."""
    return _check(alpha, r) / math.sqrt(r)


def lora_scaling(alpha: float, r: int) -> float:
    """Classic LoRA scaling ``alpha / r``: the adapter's updates collapse as r grows."""
    return _check(alpha, r) / r
