"""GPU time of a step without its host work: capture it once in a CUDA graph, time the replays.

A training step whose kernels finish faster than Python can issue them is timed by its host work
(``benchmarks.profile_step`` shows when); replaying a captured graph issues every kernel with one
call, so its time is the GPU's. The sweep keeps the host-inclusive time (what an eager training
loop sees); the tuner and the step profile use this one to compare kernels.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["capture_graph", "cuda_graph_ms"]


def _reset_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def capture_graph(step: Callable[[], object], grads: Iterable[torch.Tensor] = (), warmup: int = 3):
    """(graph, what ``step()`` returned while being captured). Warm-up runs on a side stream, as
    ``torch.cuda.graphs`` documents; ``grads``: tensors whose ``.grad`` is reset to None before each
    warm-up call and before the capture, so that the captured backward writes fresh gradients rather
    than accumulating."""
    grads = list(grads)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            _reset_grads(grads)
            step()
    torch.cuda.current_stream().wait_stream(side)
    _reset_grads(grads)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def cuda_graph_ms(step: Callable[[], object], grads: Iterable[torch.Tensor] = (), warmup: int = 3,
                  rep: int = 100) -> float:
    """Median ms of ``step()`` replayed from a CUDA graph (:func:`capture_graph`;
    ``triton.testing.do_bench``: L2 flushed between replays)."""
    from triton.testing import do_bench

    grads = list(grads)
    graph, _ = capture_graph(step, grads, warmup)
    try:
        return float(do_bench(graph.replay, warmup=10, rep=rep, return_mode="median"))
    finally:
        _reset_grads(grads)
        del graph
