"""GPU time of a step without its host work: capture it once in a CUDA graph, time the replays.

A training step whose kernels finish faster than Python can issue them is timed by its host work
(``benchmarks.profile_step`` shows when); replaying a captured graph issues every kernel with one
call, so its time is the GPU's. The sweep keeps the host-inclusive time (what an eager training
loop sees); the tuner and the step profile use this one to compare kernels.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["cuda_graph_ms"]


def cuda_graph_ms(step: Callable[[], object], grads: Iterable[torch.Tensor] = (), warmup: int = 3,
                  rep: int = 100) -> float:
    """Median ms of ``step()`` replayed from a CUDA graph (``triton.testing.do_bench``: L2 flushed
    between replays). ``grads``: tensors whose ``.grad`` is reset to None before the warm-up calls
    and before the capture, so that the captured backward writes fresh gradients rather than
    accumulating. Warm-up runs on a side stream, as ``torch.cuda.graphs`` documents."""
    from triton.testing import do_bench

    grads = list(grads)

    def reset():
        for t in grads:
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            reset()
            step()
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    try:
        return float(do_bench(graph.replay, warmup=10, rep=rep, return_mode="median"))
    finally:
        reset()
        del graph
