"""Fine-tune with Hugging Face ``Trainer`` + PEFT LoRA, the layers running on rslora-kernels.

An existing PEFT training script needs two lines more, right after ``get_peft_model``:

    import rslora_kernels as rk
    rk.peft.patch(model)          # every PEFT LoRA Linear now runs the fused op; nothing else changes

Here the script is a small one that runs anywhere without a download: a tiny Llama-architecture
model with random weights (``transformers.LlamaConfig``), rsLoRA adapters on all seven projections,
and as its text the documentation of ``rslora_kernels.peft`` itself, tokenized byte by byte (token id
= the UTF-8 byte, vocabulary 256). ``Trainer`` trains it for a few steps and prints the losses;
saving, loading and merging the adapters are PEFT's as always (``patch`` changes only ``forward``).

    python examples/finetune.py                 # 30 steps on the CPU, seconds
    python examples/finetune.py --no-patch      # the same run on PEFT's own forward
    python examples/finetune.py --steps 200 --rank 64 --dropout 0.1
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import rslora_kernels as rk


def byte_dataset(text: str, seq: int):
    """Non-overlapping windows of ``seq`` bytes of ``text``, each a causal-LM example (labels = inputs)."""
    ids = list(text.encode("utf-8"))
    return [{"input_ids": ids[i:i + seq], "labels": ids[i:i + seq]} for i in range(0, len(ids) - seq + 1, seq)]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--no-patch", action="store_true", help="leave PEFT's forward in place (for comparison)")
    args = ap.parse_args(argv)

    model = tiny_llama()
    lora = LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=args.dropout, use_rslora=True, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    if not args.no_patch:
        n = rk.peft.patch(model)  # <- the line this example is about
        print(f"rk.peft.patch: {n} LoRA layers now run rslora_kernels' fused op")

    train = byte_dataset(rk.peft.__doc__ or "", args.seq)  # the package's own docs, no download
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=4,
                                  learning_rate=2e-3, logging_steps=max(1, args.steps // 10), save_strategy="no",
                                  report_to=[], remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
                                  disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=train)
        result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{len(train)} examples of {args.seq} bytes; losses every {targs.logging_steps} steps: "
          + " ".join(f"{v:.3f}" for v in losses))
    print(f"final training loss {result.training_loss:.4f} over {args.steps} steps "
          f"({'PEFT forward' if args.no_patch else 'patched'})")
    return losses


if __name__ == "__main__":
    main()
