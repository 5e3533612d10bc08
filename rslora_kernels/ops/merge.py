"""In-place merge of a LoRA adapter into its base weight: ``W <- W + sign * s * (B @ A)``.

    W [N, K] (any strides)   B [N, r]   A [r, K]   s = scaling   sign = +1 (merge) or -1 (unmerge)

Two implementations, one contract (fp32 arithmetic -- float64 for a float64 W -- and a single
rounding to W's dtype per element, no N x K temporary):

* Triton (``merge_kernel._merge_kernel``): one program per [BLOCK_N, BLOCK_K] tile of W. It accumulates
  ``B_tile @ A_tile`` over the rank in BLOCK_R steps in fp32 (IEEE dots: merging is done once, so
  it pays for exactness), adds the fp32 value of W's tile and stores once in W's dtype.
  Used on CUDA and, with ``TRITON_INTERPRET=1``, on CPU tensors.
* PyTorch (``_merge_torch``): the CPU path when Triton cannot run. It walks W in blocks of rows,
  computes ``W_rows + sign * s * B_rows @ A`` in fp32 and copies the block back, so the largest
  temporary is ``rows_per_block x K`` (about 4 MiB of fp32), never N x K.

Rounding of an unmerge. In fp32 the round trip merge -> unmerge returns W up to fp32 arithmetic
error. In bf16/fp16 every merge and every unmerge rounds each element once to W's dtype, so
``unmerge(merge(W))`` equals W only up to one rounding step (one ulp of the merged value,
``|W' - W| <= ulp(max(|W|, |W + s B A|))``); repeated merge/unmerge cycles can drift by that much
per cycle. Keep a copy of W if you need it bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._runtime import triton_available_for

__all__ = ["merge_lora_", "TRITON_MERGE_DTYPES"]

TRITON_MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROW_BLOCK_ELEMS = 1 << 20  # fp32 elements per block of rows in the PyTorch path (4 MiB)


def _merge_torch(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, sign: float) -> None:
    """Chunked PyTorch merge: fp32 (float64 for float64 W) math on blocks of rows, one rounding."""
    N, K = weight.shape
    math_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    A = lora_A.to(math_dtype)
    rows = max(1, _ROW_BLOCK_ELEMS // max(K, 1))
    for n0 in range(0, N, rows):
        block = weight[n0:n0 + rows]
        B_rows = lora_B[n0:n0 + rows].to(math_dtype)
        if block.dtype == math_dtype:  # already wide: update the rows in place
            block.addmm_(B_rows, A, alpha=sign * scaling)
        else:  # fp32 copy of the rows, one rounding when copied back
            block.copy_(block.to(math_dtype).addmm_(B_rows, A, alpha=sign * scaling))


@torch.no_grad()
def merge_lora_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, sign: float = 1.0) -> Tensor:
    """``weight += sign * scaling * lora_B @ lora_A`` in place; returns ``weight``.

    Args:
        weight: ``[N, K]`` base weight, any strides (pass ``W.t()`` for a fan_in_fan_out layout).
        lora_A: ``[r, K]``; lora_B: ``[N, r]``, any float dtype (PEFT's fp32 adapters included).
        scaling: the adapter scale s. sign: +1.0 merges, -1.0 unmerges.

    Runs the Triton kernel when Triton can run on ``weight``'s device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``) and W is fp16/bf16/fp32; otherwise the chunked PyTorch path.
    Autograd's version counter of ``weight`` is bumped, so a backward that saved W notices.
    """
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"weight, lora_A and lora_B must be 2-D, got {tuple(weight.shape)}, "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    N, K = weight.shape
    R = lora_A.shape[0]
    if lora_A.shape[1] != K or tuple(lora_B.shape) != (N, R):
        raise ValueError(f"lora_A must be [r, K] = [r, {K}] and lora_B [N, r] = [{N}, {R}]; "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if not (weight.device == lora_A.device == lora_B.device):
        raise ValueError(f"weight ({weight.device}), lora_A ({lora_A.device}) and lora_B ({lora_B.device}) "
                         "must share a device")
    if not all(t.is_floating_point() for t in (weight, lora_A, lora_B)):
        raise TypeError("weight, lora_A and lora_B must be floating-point tensors")
    subclass = next((type(t).__name__ for t in (weight, lora_A, lora_B)
                     if type(t) not in (torch.Tensor, torch.nn.Parameter)), None)
    if subclass is not None:  # e.g. FSDP2's sharded DTensor parameters: the kernel would see one shard
        raise TypeError(f"merge needs plain tensors, got a {subclass}; merge before sharding the model "
                        "(fully_shard) or on gathered (unsharded) parameters")
    if weight.numel() == 0:
        return weight
    if triton_available_for(weight.device) and weight.dtype in TRITON_MERGE_DTYPES:
        from .merge_kernel import merge_triton_

        merge_triton_(weight, lora_A, lora_B, float(sign) * float(scaling))
        torch.autograd.graph.increment_version(weight)
    else:
        _merge_torch(weight, lora_A, lora_B, float(scaling), float(sign))  # in-place copy_ bumps the version
    return weight
