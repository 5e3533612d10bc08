"""pytest-benchmark entry points: a small rank sweep of forward+backward, one group per rank.

    pytest benchmarks --benchmark-only                       # table grouped by rank
    pytest benchmarks --benchmark-only --benchmark-autosave  # store, then compare with --benchmark-compare

CI runs ``pytest`` on ``tests/`` only, so these are never part of CI. On a GPU the shape is the
7B attention projection (K=N=4096, M=4096, bf16); on the CPU M=256, K=N=1024 in fp32. Providers
that cannot run here (e.g. triton without a GPU) are skipped with the reason.
For the full sweep with roofline, memory and plots use ``python -m benchmarks.sweep``.
"""
import pytest
import torch
from torch import nn

from . import providers as prov
from .sweep import ALPHA, Rotating

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
M, K, N = (4096, 4096, 4096) if GPU else (256, 1024, 1024)
RANKS = (4, 64, 512)
DROPOUT = 0.1


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("provider", prov.ALL_PROVIDERS)
def test_fwd_bwd(benchmark, provider, rank):
    missing = prov.available(DEVICE, DTYPE)
    if provider in missing:
        pytest.skip(missing[provider])
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    layer = prov.make_layer(provider, base, rank, ALPHA, DROPOUT)
    params = [p for p in layer.parameters() if p.requires_grad]
    xs = Rotating(lambda: torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True), 4)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)

    def step():
        x = xs.next()
        layer(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None
        if GPU:
            torch.cuda.synchronize()

    step()  # warm-up (compiles kernels / graphs outside the timed rounds)
    benchmark.group = f"fwd+bwd r={rank} M={M} K={K} N={N} {str(DTYPE)[6:]} p={DROPOUT}"
    benchmark.extra_info.update(provider=provider, rank=rank, M=M, K=K, N=N)
    benchmark(step)
