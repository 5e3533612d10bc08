"""A whole training step of a Llama-shaped model: PEFT's LoRA as it is, and patched by ``rk.peft.patch``.

    python -m benchmarks.train_step                        # the preset for the device it finds
    python -m benchmarks.train_step --preset cpu           # tiny fp32 Llama, a few minutes on 2 cores
    python -m benchmarks.train_step --preset gpu --ranks 16 256 --dropout 0.1
    python -m benchmarks.train_step --dora | --quant nf4 | --checkpointing | --compile

The model is ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (random weights, no
download); PEFT LoRA (``use_rslora=True``, alpha 16) on all seven projection types (q, k, v, o, gate,
up, down); ``torch.optim.AdamW`` on the adapters; one fixed batch of token ids as input and labels.
A step is ``zero_grad``, forward with the loss, backward, ``optimizer.step()``. Providers:

    peft        PEFT's defaults: ``get_peft_model(model, cfg)``; adapters in fp32 (PEFT upcasts them)
    peft-bf16   ``get_peft_model(..., autocast_adapter_dtype=False)``: adapters in the model dtype
                (identical to ``peft`` when the model is fp32, so not run there)
    auto        ``peft`` + ``rk.peft.patch(model)``: the two lines a user adds
    triton      ``peft`` + ``rk.peft.patch(model, backend="triton")`` (GPU only: the CPU runs Triton
                in its interpreter, far too slow to time)
    composite   ``peft`` + ``rk.peft.patch(model, backend="composite")`` (not run where ``auto``
                already means composite: every CPU)
    siblings    ``peft`` + ``rk.peft.patch(model, fuse_siblings=True)``: q/k/v and gate/up, which read
                one x, run as one ``rk.lora_linear_group`` each (docs/group.md); only when named in
                ``--providers`` (off by default in ``patch``, so not what a user gets)

Per (rank, dropout, provider): step ms (median of the warm steps), tokens/s, speedup vs ``peft`` and
vs ``peft-bf16``, memory (CUDA: ``max_memory_allocated`` over the provider's steps, the model,
adapters and AdamW state included, one provider resident at a time; CPU: the bytes one forward
saves for backward, parameters not counted, ``providers.saved_for_backward``) and, at dropout 0, the
loss of every step (``--loss-steps``, 20). The loss curves follow the project's numerics rule,
applied to the curve as one result: with ``L_ref`` the same PEFT model trained in a wider dtype
(float64 on the CPU, float32 for a 16-bit model),

    max_t |L(t) - L_ref(t)| <= 2 * max_t |L_peft(t) - L_ref(t)| + 4 eps(dtype) max_t |L_ref(t)|

A trajectory through AdamW amplifies rounding step by step, so the bound grows with PEFT's own
drift; what it checks is that the patched model drifts no more than twice as far from the wide
reference as PEFT in the same dtype does. At dropout > 0 the curves are not compared: PEFT's masks
come from ``nn.Dropout``, the patched layers' from the project's Philox stream.

On the CPU the providers of a (rank, dropout) take turns step by step (noise on the shared machine
hits them alike); on CUDA they run one after another, each alone in memory. Outputs: a table on
stdout, ``train_step.csv``, ``train_step.json``, ``train_step.md`` and ``train_step.png`` (step
time and memory by rank) under ``--out`` (default ``out/train_step``).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import rslora_kernels as rk

from . import providers as prov
from .sweep import fmt_bytes

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALPHA = 16.0
LR = 1e-3
PROVIDERS = ("peft", "peft-bf16", "auto", "triton", "composite", "siblings")
DEFAULT_PROVIDERS = PROVIDERS[:-1]
PATCHED = ("auto", "triton", "composite", "siblings")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Preset:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    seq: int
    batch: int
    dtype: str
    ranks: tuple = (16, 64, 256, 1024)
    timed_steps: int = 6  # warm steps timed at dropout > 0 (dropout 0 times the loss curve's warm steps)


PRESETS = {
    # Llama-3-8B's dimensions, 4 of its 32 decoder layers, 8192 tokens a step
    "gpu": Preset(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=4, seq=2048,
                  batch=4, dtype="bf16"),
    # Llama's proportions (GQA 2:1, MLP 2.75x; K a multiple of 64, the 4-bit blocksize) at hidden 256: the CPU preset, minutes on 2 cores
    "cpu": Preset(hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=1024, layers=2, seq=128, batch=4,
                  dtype="fp32", timed_steps=8),
    # the tests' and the GPU run's dry-run size: seconds
    "tiny": Preset(hidden=64, intermediate=192, heads=4, kv_heads=2, vocab=256, layers=1, seq=16, batch=2,
                   dtype="fp32", ranks=(4, 8), timed_steps=2),
}


# ----------------------------------------------------------------------------------------------
# The model, its adapters, one training step
# ----------------------------------------------------------------------------------------------
def llama_config(preset: Preset):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                       num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
                       vocab_size=preset.vocab, num_hidden_layers=preset.layers,
                       max_position_embeddings=preset.seq, tie_word_embeddings=False, use_cache=False,
                       attn_implementation="sdpa")


def _quantize_linears(model, quant: str) -> None:
    """Every projection of the decoder layers -> a frozen bitsandbytes 4-bit layer (the embedding and
    the LM head stay dense, as QLoRA loads them); marked as transformers marks a 4-bit model, so PEFT
    builds its ``lora.bnb.Linear4bit`` layers."""
    from .qlora_providers import quantized_base
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if lin is not None:
                    setattr(parent, name, quantized_base(lin, quant))
    model.is_loaded_in_4bit = True


def build(provider: str, preset: Preset, r: int, p: float, device: torch.device, dtype: torch.dtype, *,
          wide: Optional[torch.dtype] = None, dora=False, quant=None, checkpointing=False, compile=False, seed=0):
    """(callable model, AdamW) for ``provider``: the same base weights and initial adapters for
    every provider (one seed; weights drawn in fp32, then rounded to ``dtype``), PEFT's
    initialisation (B = 0). ``wide``: the whole model, adapters included, cast up to that dtype
    before training (the loss curve's reference: the same values, wider arithmetic)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(preset))
    model.to(dtype)
    if quant:
        _quantize_linears(model, quant)
    if checkpointing:
        kwargs = {"use_reentrant": False}  # inputs of the frozen embedding need no grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    cfg = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p, target_modules=list(TARGETS), use_rslora=True,
                     use_dora=dora, task_type="CAUSAL_LM")
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, cfg, autocast_adapter_dtype=provider != "peft-bf16")
    if wide is not None:
        model.to(wide)
    if provider in PATCHED:
        n = (rk.peft.patch(model, fuse_siblings=True) if provider == "siblings"
             else rk.peft.patch(model, backend=provider))
        if n != len(TARGETS) * preset.layers:
            raise RuntimeError(f"rk.peft.patch switched {n} layers, expected {len(TARGETS) * preset.layers}")
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR)
    return (torch.compile(model) if compile else model), opt


class Run:
    """One provider's model in training: ``step()`` times one step and records its loss."""

    def __init__(self, name, model, opt, ids):
        self.name, self.model, self.opt, self.ids = name, model, opt, ids
        self.losses: List[float] = []
        self.seconds: List[float] = []

    def step(self):
        sync = torch.cuda.synchronize if self.ids.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        value = loss.item()  # waits for the GPU
        self.seconds.append(time.perf_counter() - t0)
        self.losses.append(value)

    def saved_bytes(self) -> int:
        """Bytes one forward (with the loss) saves for backward, the model's parameters not counted."""
        params = [q for q in self.model.parameters()]
        nbytes, _ = prov.saved_for_backward(lambda: self.model(input_ids=self.ids, labels=self.ids).loss, params)
        return nbytes


# ----------------------------------------------------------------------------------------------
# The sweep over ranks and dropout
# ----------------------------------------------------------------------------------------------
def skipped_providers(names, device: torch.device, dtype: torch.dtype, quant) -> Dict[str, str]:
    """Providers that do not run here, each with the reason printed under the table."""
    from rslora_kernels._runtime import triton_available_for
    from rslora_kernels.ops.lora_linear import choose_auto_backend
    out = {}
    if dtype == torch.float32 and "peft-bf16" in names:
        out["peft-bf16"] = ("the model is fp32, so PEFT's adapters are fp32 with autocast_adapter_dtype=False too: "
                            "the same model as 'peft' (its speedup column repeats 'peft')")
    if "triton" in names and (device.type != "cuda" or not triton_available_for(device)):
        out["triton"] = ("the Triton backend needs a CUDA GPU; on the CPU it runs in Triton's interpreter, far too "
                         "slow to time")
    if "composite" in names and device.type != "cuda" and choose_auto_backend(device, dtype) == "composite":
        out["composite"] = "'auto' runs composite on the CPU: the 'auto' row is composite"
    if quant:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {n: "bitsandbytes is not installed (pip install 'rslora-kernels[qlora]')" for n in names}
    return {n: why for n, why in out.items() if n in names}


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def run(args, on_case=None) -> tuple:
    """(rows, notes) of the whole sweep; ``on_case(rows, notes)`` after each (rank, dropout) case."""
    preset = args.preset_obj
    device, dtype = torch.device(args.device), DTYPES[preset.dtype]
    skipped = skipped_providers(args.providers, device, dtype, args.quant)
    names = [n for n in args.providers if n not in skipped]
    notes = [f"{n}: not run: {why}" for n, why in skipped.items()]
    opts = dict(dora=args.dora, quant=args.quant, checkpointing=args.checkpointing, compile=args.compile)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(preset.vocab, (preset.batch, preset.seq), generator=gen).to(device)
    tokens = preset.batch * preset.seq
    interleave = device.type != "cuda"
    bar = _progress(len(args.ranks) * len(args.dropout) * len(names))
    rows = []
    started = time.perf_counter()
    cases = [(r, p) for p in args.dropout for r in args.ranks]  # every rank at the first dropout first
    for done, (r, p) in enumerate(cases):
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            notes.append(f"stopped at the time budget ({args.time_budget:.0f} s): {done} of {len(cases)} cases measured")
            break
        steps = args.loss_steps if p == 0 else args.warmup + preset.timed_steps
        groups = [names] if interleave else [[n] for n in names]
        results = {}
        for group in groups:
            if device.type == "cuda":  # the last group's models are gone (patched layers hold cycles)
                gc.collect()
                torch.cuda.empty_cache()
            runs = [Run(n, *build(n, preset, r, p, device, dtype, **opts), ids) for n in group]
            if device.type == "cuda":  # from here: the model as trained (not its fp32 draft), its steps
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                for rn in runs:
                    rn.step()
            for rn in runs:
                if device.type == "cuda":
                    mem = torch.cuda.max_memory_allocated(device)
                else:
                    mem = rn.saved_bytes()
                results[rn.name] = (rn.losses, rn.seconds, mem)  # not the model: freed with `runs`
                bar.update(1)
                bar.set_postfix_str(f"r={r} p={p} {rn.name}")
            del runs, rn
        ref = None
        if p == 0 and "peft" in results and not args.quant and not args.no_reference:
            ref_run = Run("reference", *build("peft", preset, r, p, device, dtype, wide=_ref_dtype(dtype), **opts),
                          ids)
            for _ in range(steps):
                ref_run.step()
            ref = ref_run.losses
            del ref_run
            gc.collect()
        rows += _rows(results, r, p, tokens, args.warmup, preset, dtype, ref, device)
        if on_case is not None:
            on_case(rows, notes)
    bar.close()
    if "auto" in names:
        notes += auto_notes()
    return rows, notes


def auto_notes() -> List[str]:
    """What ``backend="auto"`` ran in this process, one line per call signature it decided
    (``rk.autotune_report()`` has each candidate's time; docs/tuning.md has the rule)."""
    from rslora_kernels.ops import autotune
    decided = autotune.decisions()
    if not decided:
        return ["auto: composite at every call (no table entry near and nothing measured: first-use measuring runs on "
                "CUDA, and RSLORA_KERNELS_AUTOTUNE=0 turns it off)"]
    out = []
    for d in decided:
        cost = f", first use {d.seconds:.1f} s" if d.source == "measured" else ""
        times = ", ".join(f"{label} {ms:.3f} ms" for label, ms in sorted(d.ms.items(), key=lambda kv: kv[1]))
        out.append(f"auto: {d.signature.describe()} -> {d.choice or 'composite'} ({d.source}{cost}"
                   f"{': ' + times if times else ''})")
    return out


def _rows(results, r, p, tokens, warmup, preset, dtype, ref, device) -> List[dict]:
    base = {n: statistics.median(seconds[warmup:]) for n, (_, seconds, _) in results.items()}
    peft_losses = results["peft"][0] if "peft" in results else None
    out = []
    for name, (losses, seconds, mem) in results.items():
        ms = 1e3 * base[name]
        row = {"r": r, "dropout": p, "provider": name, "step_ms": ms, "tokens_per_s": tokens / base[name],
               "speedup_vs_peft": base["peft"] / base[name] if "peft" in base else None,
               # fp32 model: peft-bf16 is the same model as peft (not run), so it is compared with peft
               "speedup_vs_peft_bf16": (base.get("peft-bf16") or (base.get("peft") if dtype == torch.float32
                                                                   else None)),
               "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "saved_for_backward",
               "memory_bytes": mem, "memory_vs_peft": mem / results["peft"][2] if "peft" in results else None,
               "steps": len(seconds), "timed_steps": len(seconds) - warmup,
               "losses": losses if p == 0 else [], "max_abs_dloss_vs_peft": None, "loss_err": None,
               "loss_bound": None, "loss_check": "n/a (dropout > 0)" if p else "n/a"}
        if row["speedup_vs_peft_bf16"] is not None:
            row["speedup_vs_peft_bf16"] /= base[name]
        if p == 0 and peft_losses is not None:
            row["max_abs_dloss_vs_peft"] = max(abs(a - b) for a, b in zip(losses, peft_losses))
            if ref is not None:
                row.update(loss_check_row(losses, peft_losses, ref, dtype, baseline=name.startswith("peft")))
            else:
                row["loss_check"] = "n/a (no reference)"
        out.append(row)
    return out


def loss_check_row(losses, peft_losses, ref, dtype, baseline=False) -> dict:
    """The numerics rule on a loss curve (see the module docstring)."""
    err = max(abs(a - b) for a, b in zip(losses, ref))
    peft_err = max(abs(a - b) for a, b in zip(peft_losses, ref))
    bound = 2 * peft_err + 4 * torch.finfo(dtype).eps * max(abs(v) for v in ref)
    finite = all(math.isfinite(v) for v in losses)
    if baseline:
        verdict = "baseline"
    else:
        verdict = "PASS" if finite and err <= bound else "FAIL"
    return {"loss_err": err, "loss_bound": bound, "loss_check": verdict}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _progress(total):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="train_step", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())
    except ImportError:
        from .sweep import _NoBar
        return _NoBar()


COLUMNS = ("r", "p", "provider", "step ms", "tokens/s", "vs peft", "vs peft-bf16", "memory", "memory vs peft",
           "loss@0", "loss@last", "max |dL| vs peft", "loss check (err / bound)")


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    x_ = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for x in rows:
        check = x["loss_check"] if x["loss_err"] is None else \
            f"{x['loss_check']} ({x['loss_err']:.2e} / {x['loss_bound']:.2e})"
        cells = [x["r"], x["dropout"], x["provider"], f"{x['step_ms']:.1f}", f"{x['tokens_per_s']:,.0f}",
                 x_(x["speedup_vs_peft"]), x_(x["speedup_vs_peft_bf16"]), fmt_bytes(x["memory_bytes"]),
                 "-" if x["memory_vs_peft"] is None else f"{x['memory_vs_peft']:.3f}x",
                 f"{x['losses'][0]:.6f}" if x["losses"] else "-", f"{x['losses'][-1]:.6f}" if x["losses"] else "-",
                 "-" if x["max_abs_dloss_vs_peft"] is None else f"{x['max_abs_dloss_vs_peft']:.2e}", check]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def header(args, env) -> str:
    p = args.preset_obj
    mem = ("memory: CUDA max_memory_allocated over the provider's steps (model, adapters, AdamW state, activations)"
           if args.device.startswith("cuda") else
           "memory: bytes one forward saves for backward (parameters not counted)")
    opts = [o for o, on in (("--dora", args.dora), (f"--quant {args.quant}", args.quant),
                            ("--checkpointing", args.checkpointing), ("--compile", args.compile)) if on]
    where = env.get("gpu") or f"{env.get('cpu')}, {env.get('cores')} cores, {env['threads']} thread(s), " \
                              f"1-min load average {env.get('loadavg_at_start', ['?'])[0]} at the start"
    return (f"Training step of a Llama-shaped model ({args.preset}: hidden {p.hidden}, intermediate {p.intermediate}, "
            f"{p.heads} heads / {p.kv_heads} KV, vocab {p.vocab}, {p.layers} layers, seq {p.seq} x batch {p.batch}, "
            f"{p.dtype}){', ' + ' '.join(opts) if opts else ''}; PEFT LoRA use_rslora=True alpha {ALPHA:g} on "
            f"{', '.join(TARGETS)}; AdamW lr {LR:g} on the adapters.\n"
            f"{where}; torch {env['torch']}, commit {env['commit']}, {env['date_utc']}.\n"
            f"step ms: median of the warm steps (after {args.warmup}); {mem}; loss curve: {args.loss_steps} steps at "
            f"dropout 0, checked against PEFT trained in {str(_ref_dtype(DTYPES[p.dtype])).replace('torch.', '')}.")


def plot(rows, path: Path) -> Optional[Path]:
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed: no plot (pip install 'rslora-kernels[bench]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in sorted({x["dropout"] for x in rows}):
        for name in dict.fromkeys(x["provider"] for x in rows):
            pts = sorted((x["r"], x["step_ms"], x["memory_bytes"]) for x in rows
                         if x["provider"] == name and x["dropout"] == p)
            style = dict(marker="o", linestyle="-" if p == 0 else "--")
            ax_t.plot([a for a, _, _ in pts], [b for _, b, _ in pts], label=f"{name} p={p}", **style)
            ax_m.plot([a for a, _, _ in pts], [c / 2**20 for _, _, c in pts], label=f"{name} p={p}", **style)
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("step ms (median)")
    ax_m.set_ylabel("MiB (" + rows[0]["memory_kind"].replace("_", " ") + ")")
    ax_t.legend(fontsize=7)
    fig.suptitle("Llama-shaped training step: PEFT vs rk.peft.patch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu with CUDA, else cpu")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=PROVIDERS,
                    help=f"default: {' '.join(DEFAULT_PROVIDERS)}")
    ap.add_argument("--ranks", nargs="+", type=int, help="default: the preset's (16 64 256 1024)")
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--loss-steps", type=int, default=20, help="steps at dropout 0 (the loss curve)")
    ap.add_argument("--warmup", type=int, default=2, help="steps not timed")
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True)")
    ap.add_argument("--quant", choices=("nf4", "fp4"), help="4-bit base (bitsandbytes), QLoRA")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model, each provider")
    ap.add_argument("--no-reference", action="store_true", help="skip the wide-dtype reference curve")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--time-budget", type=float, help="seconds; start no new case after this (results so far are kept)")
    ap.add_argument("--out", default="out/train_step")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    preset = PRESETS[args.preset]
    if args.layers:
        preset = dataclasses.replace(preset, layers=args.layers)
    args.preset_obj = preset
    args.ranks = args.ranks or list(preset.ranks)
    if any(r < 1 for r in args.ranks):
        ap.error("--ranks must be positive integers")
    if any(not 0 <= p < 1 for p in args.dropout):
        ap.error("--dropout values must be in [0, 1)")
    if args.loss_steps <= args.warmup:
        ap.error("--loss-steps must exceed --warmup (the warm steps are timed)")
    return args


def write_outputs(args, env, rows, notes, out: Path, final: bool) -> str:
    """The table (returned) and train_step.md/.csv/.json (and .png when ``final``) under ``out``;
    rewritten after every case, so a run stopped by a time box leaves what it measured."""
    text = header(args, env) + "\n\n" + markdown(rows) + "\n" + "".join(f"\nnote: {n}" for n in notes)
    if final:
        text += f"\n\nwall time {env['wall_s']} s" + (f", 1-min load average {env['loadavg_at_end'][0]} at the end"
                                                      if env.get("loadavg_at_end") else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.md").write_text(text + "\n")
    fields = [k for k in rows[0] if k != "losses"] if rows else []
    with open(out / "train_step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    meta = {k: v for k, v in vars(args).items() if k != "preset_obj"}
    meta["preset_dims"] = dataclasses.asdict(args.preset_obj)
    (out / "train_step.json").write_text(json.dumps({"env": env, "args": meta, "notes": notes, "rows": rows},
                                                    indent=1) + "\n")
    if final and rows:
        plot(rows, out / "train_step.png")
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .sweep import environment
    env = environment(torch.device(args.device))
    out = Path(args.out)
    t0 = time.perf_counter()
    rows, notes = run(args, on_case=lambda rows, notes: write_outputs(args, env, rows, notes, out, final=False))
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    if env.get("cores"):
        env["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(write_outputs(args, env, rows, notes, out, final=True))
    if "auto" in args.providers:
        print(rk.autotune_report())
    print(f"wrote {out}/train_step.md, .csv, .json" + (", .png" if (out / "train_step.png").exists() else ""))
    return 1 if any(x["loss_check"] == "FAIL" for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
