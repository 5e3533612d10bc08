"""Our layers under DDP and FSDP2 (fully_shard): 2 processes on the CPU with gloo.

Each rank runs half of the batch; the averaged adapter gradients must match a single-process run
on the full batch (the float64 reference, within the numerics rule of tests/numerics.py). The fused op runs inside (backend="triton": the Triton interpreter on CPU) when
Triton can run on CPU tensors.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels._runtime import triton_available_for

WORLD = 2
# gloo on CPU tensors: the fused Triton kernels run there in the interpreter (TRITON_INTERPRET=1,
# set by conftest when there is no GPU and inherited by the workers); otherwise "auto"
BACKEND = "triton" if triton_available_for(torch.device("cpu")) else "auto"


def _model(backend=BACKEND):
    torch.manual_seed(0)
    blocks = [nn.Sequential(rk.LoRALinear(20, 20, r=3, alpha=6.0, backend=backend), nn.Tanh()) for _ in range(2)]
    model = nn.Sequential(*blocks, rk.LoRALinear(20, 7, r=2, alpha=4.0, bias=False, backend=backend))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, rk.LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * WORLD, 5, 20, generator=g), torch.randn(2 * WORLD, 5, 7, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, mode, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in model[:2]:
                fully_shard(block)
            wrapped = fully_shard(model)
        x, y = _batch()
        shard = slice(rank * 2, rank * 2 + 2)  # each rank: half of the batch
        _loss(wrapped, x[shard], y[shard]).backward()
        grads = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = p.grad
                grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2: DTensor shards
            else:
                assert p.grad is None, name
        if mode == "fsdp2":  # sharded parameters (DTensor) cannot be merged in place: a clear error
            try:
                model[2].merge()
            except TypeError as e:
                assert "DTensor" in str(e), e
            else:
                raise AssertionError("merge() of sharded parameters did not raise")
        if rank == 0:
            torch.save(grads, out_path)
        dist.barrier()  # both ranks done with gloo before teardown
    finally:
        dist.destroy_process_group()
    # Everything is checked and saved. Leave without the interpreter's teardown: on a loaded machine
    # a gloo background thread can still be joinable when its C++ destructor runs, and the worker
    # dies in std::terminate ("terminate called without an active exception", SIGABRT) although its
    # work is complete. An error above still propagates (this line is not reached).
    os._exit(0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_grads_equal_single_process(mode, tmp_path):
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(mode, _free_port(), out_path), nprocs=WORLD, join=True)
    got = torch.load(out_path)

    def single_process(dtype):  # the reference backend on the full batch, in dtype
        model = _model("reference").to(dtype)
        x, y = _batch()
        _loss(model, x.to(dtype), y.to(dtype)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    oracle, same = single_process(torch.float64), single_process(torch.float32)
    assert got.keys() == oracle.keys() and len(oracle) == 6
    for name in oracle:
        assert torch.count_nonzero(oracle[name]) > 0
        assert_close_to_oracle(name, got[name], oracle[name], same[name])
