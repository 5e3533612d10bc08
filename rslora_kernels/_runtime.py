"""Runtime facts looked up lazily (never at import time)."""
import os
from typing import Optional

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available_for(device: torch.device) -> bool:
    """Whether the Triton backend can run on tensors of ``device``."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small nominal count on the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def cuda_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); 0 on the CPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


def gpu_name(device: Optional[torch.device] = None) -> Optional[str]:
    """The CUDA device's name as the driver reports it (``device`` None: the current device);
    None when ``device`` is not a CUDA device or CUDA is unavailable."""
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)
