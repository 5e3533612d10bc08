"""Runtime facts looked up lazily (never at import time)."""
import os
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available_for(device: torch.device) -> bool:
    """Whether the Triton backend can run on tensors of ``device``."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


@lru_cache(maxsize=None)
def _cuda_facts(index: int) -> Tuple[str, int, int]:
    """(name, compute capability as 10 * major + minor, SMs) of CUDA device ``index``: asked once
    per device, since every kernel launch consults them and the driver query costs host time."""
    props = torch.cuda.get_device_properties(index)
    return props.name, 10 * props.major + props.minor, props.multi_processor_count


def _cuda_index(device: Optional[torch.device]) -> int:
    return device.index if device is not None and device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small nominal count on the CPU interpreter."""
    if device.type == "cuda":
        return _cuda_facts(_cuda_index(device))[2]
    return 4


def cuda_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); 0 on the CPU."""
    if device.type == "cuda":
        return _cuda_facts(_cuda_index(device))[1]
    return 0


def gpu_name(device: Optional[torch.device] = None) -> Optional[str]:
    """The CUDA device's name as the driver reports it (``device`` None: the current device);
    None when ``device`` is not a CUDA device or CUDA is unavailable."""
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return _cuda_facts(_cuda_index(device))[0]


_SHARED: Dict[Tuple[torch.device, str], torch.Tensor] = {}


def shared_tensor(device: torch.device, kind: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor that nothing writes (a zero seed, an empty mask state), made by ``make()`` once per
    (device, kind) and shared by every call instead of allocated per call. A fresh one under
    torch.compile's tracing and during CUDA-graph capture (whose memory pool must not hand out a
    tensor that outlives the graph), and under inference mode (an inference tensor, once shared,
    could not be saved for backward by a later call outside it)."""
    held = _SHARED.get((device, kind))
    if held is not None:
        return held
    made = make()
    if (not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        _SHARED[(device, kind)] = made
    return made
