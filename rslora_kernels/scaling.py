"""Adapter scaling factors: rank-stabilized (rsLoRA) and classic LoRA; a tensor scaling folded into B."""
import math

import torch

from ._validate import check_real, check_scaling, need_tensors

__all__ = ["rslora_scaling", "lora_scaling", "fold_scaling"]


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


def fold_scaling(scaling, x, lora_A, lora_B):
    """``(lora_A, lora_B, scaling)`` as the ops' kernels take them: the scale a Python float.

    A real number comes back as given (nothing else is done). A 0-d floating tensor ``s`` (on x's
    device or the CPU; PEFT holds one after ``prepare_model_for_compiled_hotswap``) is folded into
    B: ``B_s = B * s`` and scaling 1.0, since ``s (x A^T) B^T = (x A^T) (B s)^T``. Its value is never
    read on the host: no synchronization on a GPU, and under torch.compile the graph takes ``s`` as
    an input, so a new value needs no recompile. ``B_s`` is differentiable (autograd gives dB and,
    when ``s`` requires grad, ds). It is formed in ``promote_types(B's dtype, float32)``, with A cast
    to that dtype as well (exact; no copy for PEFT's fp32 adapters): every backend rounds the
    adapters to x's dtype for its products anyway, but a bf16/fp16 ``B_s`` would round ``B * s`` to
    the adapter dtype once more before that, and DoRA's row norms and the adapters' gradients are
    taken in fp32 from the adapters as given. On a CUDA x a CPU ``s`` is read by the host when the
    multiply is issued (a CPU scalar operand: no device synchronization; only its gradient, if it
    requires one, comes back from the GPU in backward). NaN or Inf in ``s`` is not
    checked (that would read it) and propagates: NaN gives NaN wherever the reference's output is
    NaN, Inf gives non-finite values wherever the reference's are (±Inf and NaN may differ, the
    product being taken in another order). Arguments that do not fit together are returned
    unfolded, for the op's checks to name."""
    if not isinstance(scaling, torch.Tensor):
        return lora_A, lora_B, scaling
    need_tensors(("x", x), ("lora_A", lora_A), ("lora_B", lora_B))
    check_scaling(scaling, x.device)
    if lora_A.dtype != lora_B.dtype or lora_A.device != x.device or lora_B.device != x.device:
        return lora_A, lora_B, scaling  # validate_inputs names the mismatch
    dtype = torch.promote_types(lora_B.dtype, torch.float32)
    return lora_A.to(dtype), lora_B.to(dtype) * scaling, 1.0
