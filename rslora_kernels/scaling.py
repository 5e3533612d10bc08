"""Adapter scaling factors: rank-stabilized (rsLoRA) and classic LoRA."""
import math

__all__ = ["rslora_scaling", "lora_scaling"]


def _check(alpha: float, r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be finite, got {alpha!r}")


def rslora_scaling(alpha: float, r: int) -> float:
    """rsLoRA scaling ``alpha / sqrt(r)`` (arXiv 2312.03732): keeps learning stable as r grows."""
    _check(alpha, r)
    return float(alpha) / math.sqrt(r)


def lora_scaling(alpha: float, r: int) -> float:
    """Classic LoRA scaling ``alpha / r``: the adapter's updates collapse as r grows."""
    _check(alpha, r)
    return float(alpha) / r
