"""The character-level language model: a GRU on the Python standard library's own source files (no download)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .base import Batch, Metric, MissingDependency, Target, Task

__all__ = ["STDLIB_FILES", "VOCAB", "CharLM", "encode_text", "load_stdlib_text"]


STDLIB_FILES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "shlex.py",
    "glob.py",
    "queue.py",
    "sched.py",
    "difflib.py",
    "calendar.py",
    "argparse.py",
    "dataclasses.py",
)
"""Standard library modules (plain ``.py`` files since Python 3.0 and still in 3.14) the text is read from, in
order; if they fall short, the remaining top-level ``.py`` files follow in sorted order."""

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
"""Newline and printable ASCII; any other character (tabs, non-ASCII) is one extra symbol, so 97 in all."""


def load_stdlib_text(chars: int = 65536, root: str | None = None) -> str:
    """The first ``chars`` characters of the standard library files :data:`STDLIB_FILES` (``root``: the directory
    of ``os.py`` unless given), concatenated. The same text on every machine with the same Python version."""
    root = root if root is not None else os.path.dirname(os.__file__)
    names = [n for n in STDLIB_FILES if os.path.isfile(os.path.join(root, n))]
    try:
        others = sorted(n for n in os.listdir(root) if n.endswith(".py") and n not in names)
    except OSError:
        others = []
    parts: list[str] = []
    total = 0
    for name in names + others:
        if total >= chars:
            break
        try:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parts.append(text)
        total += len(text)
    text = "".join(parts)[:chars]
    if len(text) < chars:
        raise MissingDependency(
            f"the char-lm task reads the Python standard library's .py files; only {len(text)} of {chars} characters "
            f"were found in {root}"
        )
    return text


def encode_text(text: str) -> Tensor:
    """Characters as indices into :data:`VOCAB` (anything else: ``len(VOCAB)``)."""
    index = {c: i for i, c in enumerate(VOCAB)}
    other = len(VOCAB)
    return torch.tensor([index.get(c, other) for c in text], dtype=torch.int64)


class _CharGRU(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


class CharLM(Task):
    """A character-level language model (embedding 32, GRU 128, linear) on Python standard library source text.

    The text is :func:`load_stdlib_text` (``chars`` characters); its last ``test_fraction`` is the test text. An
    epoch is every ``seq_len``-character window of the training text once, from an offset drawn per epoch, in a
    shuffled order; the loss is the mean cross-entropy of the next character (nats per character). The training loss
    is measured on the first 8,192 characters of the training text, the test loss and next-character accuracy on the
    whole test text.
    """

    name = "char-lm"
    description = "character-level GRU LM (embed 32, hidden 128) on 64k characters of the Python standard library"
    metrics = (
        Metric("train_loss", "train loss"),
        Metric("test_loss", "test loss"),
        Metric("test_accuracy", "test acc", higher_is_better=True),
    )
    target = Target("test_loss", 2.0)
    default_epochs = 6
    default_batch_size = 32
    train_above_test = (
        "the test text (the last eighth of the characters: other modules of the standard library) is easier to "
        "predict than the training text; both losses are scored alike, with the final weights (no dropout, no "
        "smoothing)"
    )

    def __init__(
        self,
        seed: int = 0,
        batch_size: int | None = None,
        seq_len: int = 64,
        chars: int = 65536,
        hidden: int = 128,
        embed: int = 32,
        test_fraction: float = 0.125,
        text: str | None = None,
    ) -> None:
        super().__init__(seed, batch_size)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.hidden, self.embed = seq_len, hidden, embed
        tokens = encode_text(text if text is not None else load_stdlib_text(chars))
        n_test = int(len(tokens) * test_fraction)
        self.train_tokens, self.test_tokens = tokens[: len(tokens) - n_test], tokens[len(tokens) - n_test :]
        # Windows start at offset, offset + seq_len, ...: this many fit whatever the offset (< seq_len) is.
        self.windows = len(self.train_tokens) // seq_len - 1
        if self.windows < 1 or len(self.test_tokens) < seq_len + 1:
            raise ValueError(f"the text is too short for seq_len {seq_len}")

    def build_model(self) -> nn.Module:
        return _CharGRU(len(VOCAB) + 1, self.embed, self.hidden)

    def _windows(self, tokens: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = tokens[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, epoch: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offset = int(torch.randint(self.seq_len, (), generator=gen))
        starts = offset + self.seq_len * torch.randperm(self.windows, generator=gen)
        for i in range(0, len(starts), self.batch_size):
            yield self._windows(self.train_tokens, starts[i : i + self.batch_size])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def _score(self, model: nn.Module, tokens: Tensor, starts: Tensor | None = None) -> tuple[float, float]:
        if starts is None:
            starts = torch.arange(0, len(tokens) - self.seq_len, self.seq_len)
        x, y = self._windows(tokens, starts)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
        return loss, (logits.argmax(-1) == y).float().mean().item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        # The train loss is scored on windows spread over the whole training text (8192 characters' worth), not
        # on its first 8192 characters: the text's parts differ in difficulty, and its first part alone scored
        # well above the test loss.
        count = min(self.windows, 8192 // self.seq_len)
        last = len(self.train_tokens) - self.seq_len - 1
        starts = torch.linspace(0, last, count).long()
        train_loss, _ = self._score(model, self.train_tokens, starts)
        test_loss, test_accuracy = self._score(model, self.test_tokens)
        return {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_accuracy}
