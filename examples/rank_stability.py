"""Reproduce the rsLoRA rank-stability result (arXiv 2312.03732, Figures 1-2) through our own layers.

Claim: with the classic scaling ``s = alpha / r`` the adapter's learning collapses as the rank grows
(its gradient norm shrinks like ``r^-1/2`` and extra rank stops helping); with ``s = alpha / sqrt(r)``
(rsLoRA) the gradient norm does not depend on the rank and more rank keeps helping.

Task (synthetic, runs on a laptop CPU in minutes, no download): a frozen two-layer MLP (the "base
model") must learn a *full-rank* weight change. The teacher is the same MLP with a dense Gaussian
delta added to both weights; every linear of the student gets a :class:`rslora_kernels.LoRALinear`
adapter and is trained to match the teacher's outputs. Because the deltas have full rank (their
singular values fill a Marchenko-Pastur bulk), a rank-r adapter can only capture the top r directions,
so more rank truly can help -- which is what makes the claim testable.

Every run uses the same alpha, optimizer (AdamW), learning rate, data stream, base weights and
teacher; the adapter init draws from the same seed. Per step we record the training loss and the L2
norm of the gradient of all adapter parameters (before the optimizer step, no clipping).

Theory for the gradient norm at init (B = 0): ``dL/dB = s * dy^T (x A^T)``. With A's rows drawn
independently, ``|x A^T|`` grows like ``sqrt(r)``, so ``|dL/dB| ~ s * sqrt(r)``: flat in r under
``alpha / sqrt(r)``, falling like ``r^-1/2`` under ``alpha / r``.

    python examples/rank_stability.py                 # CPU: ranks 4..512; 141 s measured on 2 shared cores
    python examples/rank_stability.py --quick         # ranks 4 16 64 at width 128: a ~20 s smoke run
    python examples/rank_stability.py --ranks 4 16 64 256 1024 --width 2048 --steps 1000   # on a GPU

Writes ``loss_vs_step.png``, ``grad_norm_vs_step.png``, ``final_loss_vs_rank.png``, ``results.md``
and ``results.json`` into ``--out`` (default ``examples/results``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

try:  # run from a clone without installing: make the package importable
    import rslora_kernels as rk
except ImportError:  # pragma: no cover - path fallback for `python examples/rank_stability.py`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import rslora_kernels as rk

from rslora_kernels.ops.lora_linear import resolve_backend  # noqa: E402

SCALINGS = {"alpha/r": False, "alpha/sqrt(r)": True}  # label -> LoRALinear(rank_stabilized=...)


@dataclass
class Config:
    """One sweep: every (rank, scaling) run shares all of these."""
    ranks: List[int] = field(default_factory=lambda: [4, 16, 64, 256, 512])
    width: int = 768          # MLP width (in = hidden = out); ranks must stay below it to mean something
    steps: int = 300
    batch: int = 256
    lr: float = 1e-3
    alpha: float = 16.0
    delta_scale: float = 0.5  # teacher delta entries ~ N(0, (delta_scale / sqrt(fan_in))^2)
    eval_batch: int = 4096
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"


# ----------------------------------------------------------------------------------------------
# task

def make_task(cfg: Config):
    """Frozen base MLP, teacher (base + full-rank deltas) and a fixed held-out eval set.

    Returns ``(base, teacher, x_eval, y_eval, loss_norm)``; ``loss_norm`` is the base model's
    eval MSE against the teacher, so losses are reported relative to "no adaptation" (1.0 = the
    base model, 0.0 = the teacher).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    d = cfg.width
    base = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
    with torch.no_grad():
        for lin in (base[0], base[2]):  # nn.Linear's default init, from our own generator
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
    base.requires_grad_(False)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for lin in (teacher[0], teacher[2]):
            lin.weight += torch.randn(lin.weight.shape, generator=gen) * (cfg.delta_scale / math.sqrt(lin.in_features))
    base, teacher = base.to(cfg.device), teacher.to(cfg.device)
    x_eval = torch.randn(cfg.eval_batch, d, generator=gen).to(cfg.device)
    with torch.no_grad():
        y_eval = teacher(x_eval)
        loss_norm = torch.mean((base(x_eval) - y_eval) ** 2).item()
    return base, teacher, x_eval, y_eval, loss_norm


def batches(cfg: Config):
    """The training stream: fresh Gaussian inputs, identical for every run (own generator)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.steps):
        yield torch.randn(cfg.batch, cfg.width, generator=gen).to(cfg.device)


def add_adapters(model: nn.Module, r: int, alpha: float, rank_stabilized: bool, backend: str = "auto") -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place) by ``LoRALinear.from_linear``; return it."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, rk.LoRALinear.from_linear(child, r, alpha, rank_stabilized=rank_stabilized,
                                                           backend=backend))
        else:
            add_adapters(child, r, alpha, rank_stabilized, backend)
    return model


def adapter_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, rk.LoRALinear) for p in (m.lora_A.weight, m.lora_B.weight)]


# ----------------------------------------------------------------------------------------------
# one run and the sweep

def train_one(cfg: Config, task, r: int, rank_stabilized: bool) -> Dict[str, object]:
    """Fine-tune one adapter configuration; return per-step loss and grad norm and the final eval loss."""
    base, teacher, x_eval, y_eval, loss_norm = task
    torch.manual_seed(cfg.seed + 2)  # same adapter-init stream for every run
    student = add_adapters(copy.deepcopy(base), r, cfg.alpha, rank_stabilized, cfg.backend).to(cfg.device)
    params = adapter_parameters(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses, grad_norms = [], []
    for x in batches(cfg):
        with torch.no_grad():
            y = teacher(x)
        loss = torch.mean((student(x) - y) ** 2) / loss_norm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
        losses.append(loss.item())
        opt.step()
    with torch.no_grad():
        final = (torch.mean((student(x_eval) - y_eval) ** 2) / loss_norm).item()
    return {"loss": losses, "grad_norm": grad_norms, "final_eval_loss": final,
            "scaling": rk.rslora_scaling(cfg.alpha, r) if rank_stabilized else rk.lora_scaling(cfg.alpha, r)}


def sweep(cfg: Config, progress: bool = False) -> Dict[str, Dict[int, Dict[str, object]]]:
    """Run every (scaling, rank) pair; ``results[label][r]`` is :func:`train_one`'s dict."""
    task = make_task(cfg)
    results: Dict[str, Dict[int, Dict[str, object]]] = {label: {} for label in SCALINGS}
    pairs = [(label, r) for label in SCALINGS for r in cfg.ranks]
    it = pairs
    if progress:
        from tqdm import tqdm
        it = tqdm(pairs, desc="runs", unit="run")
    for label, r in it:
        t0 = time.perf_counter()
        results[label][r] = train_one(cfg, task, r, SCALINGS[label])
        results[label][r]["seconds"] = time.perf_counter() - t0
    return results


# ----------------------------------------------------------------------------------------------
# reporting

def markdown_table(cfg: Config, results) -> str:
    """Final eval loss, grad norm at step 0 and mean grad norm over the run, per rank and scaling."""
    lines = ["| rank | scaling alpha/r | scaling alpha/sqrt(r) | final loss alpha/r | final loss alpha/sqrt(r) "
             "| grad norm @0 alpha/r | grad norm @0 alpha/sqrt(r) | mean grad norm alpha/r | mean grad norm alpha/sqrt(r) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lo, rs = results["alpha/r"], results["alpha/sqrt(r)"]
    for r in cfg.ranks:
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        lines.append(f"| {r} | {lo[r]['scaling']:.4g} | {rs[r]['scaling']:.4g} "
                     f"| {lo[r]['final_eval_loss']:.4f} | {rs[r]['final_eval_loss']:.4f} "
                     f"| {lo[r]['grad_norm'][0]:.4g} | {rs[r]['grad_norm'][0]:.4g} "
                     f"| {mean(lo[r]['grad_norm']):.4g} | {mean(rs[r]['grad_norm']):.4g} |")
    return "\n".join(lines)


def plot(cfg: Config, results, out_dir: str) -> List[str]:
    """Write the three PNGs (paper-style per-scaling panels, ranks as colours); return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.cm.viridis([i / max(1, len(cfg.ranks) - 1) for i in range(len(cfg.ranks))])
    paths = []
    for key, ylabel, fname in (("loss", "training loss (relative to base model)", "loss_vs_step.png"),
                               ("grad_norm", "adapter gradient norm", "grad_norm_vs_step.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, label in zip(axes, SCALINGS):
            for c, r in zip(colours, cfg.ranks):
                ax.plot(results[label][r][key], color=c, lw=1.2, label=f"r={r}")
            ax.set_title(f"s = {label}")
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel(ylabel)
        axes[1].legend(title="rank")
        fig.suptitle(f"{ylabel} vs step (alpha={cfg.alpha:g}, AdamW lr={cfg.lr:g}, width={cfg.width})")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, fname))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, marker in zip(SCALINGS, ("o", "s")):
        ax.plot(cfg.ranks, [results[label][r]["final_eval_loss"] for r in cfg.ranks], marker=marker, label=f"s = {label}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"held-out loss after {cfg.steps} steps")
    ax.set_title("final loss vs rank")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "final_loss_vs_rank.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="default: 4 16 64 256 512 (CPU), + 1024 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="default: 300 (CPU), 1000 (CUDA)")
    p.add_argument("--width", type=int, default=None, help="MLP width; default: 768 (CPU), 2048 (CUDA)")
    p.add_argument("--batch", type=int, default=Config.batch)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--alpha", type=float, default=Config.alpha)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--backend", default="auto", help='LoRALinear backend: auto | triton | composite | reference')
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quick", action="store_true", help="tiny sweep (ranks 4 16 64, width 128, 100 steps) to smoke-test")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> Config:
    on_gpu = a.device.startswith("cuda")
    if a.quick:
        ranks, steps, width = [4, 16, 64], 100, 128
    else:
        ranks, steps, width = ([4, 16, 64, 256, 512, 1024], 1000, 2048) if on_gpu else ([4, 16, 64, 256, 512], 300, 768)
    return Config(ranks=a.ranks or ranks, width=a.width or width, steps=a.steps or steps, batch=a.batch, lr=a.lr,
                  alpha=a.alpha, seed=a.seed, device=a.device, backend=a.backend)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if max(cfg.ranks) > cfg.width:
        raise ValueError(f"--ranks go up to {max(cfg.ranks)} but --width is {cfg.width}: a rank above the width adds no capacity")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results = sweep(cfg, progress=True)
    seconds = time.perf_counter() - t0
    backend = resolve_backend(cfg.backend, torch.device(cfg.device))
    dev = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else \
        f"CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"
    header = (f"Rank-stability sweep: {dev}, backend {backend!r}, torch {torch.__version__}, {seconds:.0f} s total.\n"
              f"Config: {json.dumps(asdict(cfg))}\n"
              f"Command: python examples/rank_stability.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip() + "\n")
    table = markdown_table(cfg, results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n" + table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "device": dev, "backend": backend, "seconds": seconds,
                   "results": {label: {str(r): v for r, v in runs.items()} for label, runs in results.items()}}, f)
    paths = plot(cfg, results, args.out)
    print(header)
    print(table)
    print("\nwrote:", *paths, os.path.join(args.out, "results.md"), os.path.join(args.out, "results.json"), sep="\n  ")


if __name__ == "__main__":
    main()
