"""The project's dropout stream, ``STREAM_VERSION`` = "philox4x32-7-u16": a keep-mask keyed by
(seed, row, col), the same bits on every device (definition: docs/design.md, "Dropout stream
specification").

    stream.py    the definition (constants, counters, threshold) and its PyTorch implementation
    kernels.py   the Triton implementation (tile helpers for the LoRA kernels; whole-mask and
                 drop-and-scale kernels); imports Triton, so it is imported lazily
    csrc.py      loader of the C++ implementation (rslora_kernels/csrc/philox_dropout.cpp), built on first use
    masking.py   masks and drop-and-scale on any device, dispatched to the implementations above

The LoRA kernels (rslora_kernels.ops) import from here; nothing here imports rslora_kernels.ops.
"""
from .masking import dropout_mask, dropout_scale, dropout_scale_, dropout_scale_pair_, keep_mask_cpu
from .stream import (SEED_BOUND, STREAM_VERSION, as_seed_int, check_dropout_p, draw_seed, drop_threshold,
                     keep_mask_torch, philox4x32)

__all__ = ["dropout_mask", "dropout_scale", "dropout_scale_", "dropout_scale_pair_", "keep_mask_cpu",
           "SEED_BOUND", "STREAM_VERSION", "as_seed_int", "check_dropout_p", "draw_seed", "drop_threshold",
           "keep_mask_torch", "philox4x32"]
