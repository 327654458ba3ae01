"""gradstep in the Hugging Face Trainer: a tiny GPT-2 built from a config (nothing downloaded), trained on CPU.

Two ways in: ``optimizers=(optimizer, scheduler)`` with a gradstep optimizer you built, or
``optimizer_cls_and_kwargs=(gradstep.AdaBelief, {...})``, where the Trainer builds it on its own parameter groups (no
decay on biases and norms, ``weight_decay`` from TrainingArguments). Checkpoints hold gradstep's state and resume
with ``trainer.train(resume_from_checkpoint=...)``.

Run: ``python examples/hf_trainer.py`` (a few seconds).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, get_cosine_schedule_with_warmup

import gradstep

VOCAB, LENGTH = 32, 12


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class CountingSequences(torch.utils.data.Dataset):
    """Sequences that count up from a random start (mod VOCAB): the next token is learnable."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out: Path, max_steps: int, **options: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=max_steps, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return TrainingArguments(**{**settings, **options})


def train_with_optimizer(out: Path, max_steps: int = 8, resume: str | None = None, **options: Any) -> Trainer:
    """``optimizers=(opt, sched)``: a gradstep optimizer on gradstep's groups, with a transformers schedule."""
    model = tiny_gpt2()
    optimizer = gradstep.AdamW(gradstep.param_groups(model, weight_decay=0.01), lr=1e-2)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=max_steps)
    trainer = Trainer(
        model=model,
        args=arguments(out, max_steps, **options),
        train_dataset=CountingSequences(),
        optimizers=(optimizer, scheduler),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def train_with_class(out: Path, max_steps: int = 8) -> Trainer:
    """``optimizer_cls_and_kwargs``: the Trainer builds the gradstep optimizer on its own parameter groups."""
    trainer = Trainer(
        model=tiny_gpt2(),
        args=arguments(out, max_steps, weight_decay=0.05),
        train_dataset=CountingSequences(),
        optimizer_cls_and_kwargs=(gradstep.AdaBelief, {"lr": 1e-2, "betas": (0.9, 0.99)}),
    )
    trainer.train()
    return trainer


def loss(model: GPT2LMHeadModel) -> float:
    batch = CountingSequences(16, seed=1).ids
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


def main(out: Path, max_steps: int = 8) -> tuple[float, float, float]:
    before = loss(tiny_gpt2())
    after_adamw = loss(train_with_optimizer(out / "adamw", max_steps).model)
    after_adabelief = loss(train_with_class(out / "adabelief", max_steps).model)
    print(f"loss: untrained {before:.3f}, AdamW {after_adamw:.3f}, AdaBelief {after_adabelief:.3f} ({max_steps} steps)")
    return before, after_adamw, after_adabelief


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp), cli.steps)
