"""The digits tasks: scikit-learn's bundled 8x8 digits (no download), an MLP and a small CNN."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import Batch, Metric, MissingDependency, Target, Task

__all__ = ["DigitsCNN", "DigitsMLP", "Split", "load_digits"]


@dataclass(frozen=True)
class Split:
    """A train/test split as float32 features and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download), split and standardised.

    The split is stratified and fixed by ``split_seed`` (not by the training seed), so every run of a comparison is
    scored on the same test images. Features are standardised with the training set's mean and deviation only.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise MissingDependency(
            "the digits tasks need scikit-learn: pip install 'gradstep[cli]' (or scikit-learn)"
        ) from None
    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    scaler = StandardScaler().fit(x_train)
    return Split(
        torch.tensor(scaler.transform(x_train), dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.int64),
        torch.tensor(scaler.transform(x_test), dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.int64),
    )


_CLASSIFICATION_METRICS = (
    Metric("train_loss", "train loss"),
    Metric("test_loss", "test loss"),
    Metric("test_accuracy", "test acc", higher_is_better=True),
)


class _DigitsTask(Task):
    """Shared by the digits tasks: shuffled minibatches, cross-entropy, loss and accuracy on the whole split."""

    metrics = _CLASSIFICATION_METRICS
    target = Target("test_accuracy", 0.95, higher_is_better=True)

    def __init__(self, seed: int = 0, batch_size: int | None = None, data: Split | None = None) -> None:
        super().__init__(seed, batch_size)
        self.data = data if data is not None else load_digits()

    def batches(self, epoch: int) -> Iterator[Batch]:
        # A generator of its own per (seed, epoch): the order depends on nothing an optimizer could change.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.y_train), generator=gen)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.data.x_train[idx], self.data.y_train[idx]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        d = self.data
        logits_test = model(d.x_test)
        return {
            # The whole training set, not the mean over recent batches (which mixes models).
            "train_loss": nn.functional.cross_entropy(model(d.x_train), d.y_train).item(),
            "test_loss": nn.functional.cross_entropy(logits_test, d.y_test).item(),
            "test_accuracy": (logits_test.argmax(dim=1) == d.y_test).float().mean().item(),
        }


class DigitsMLP(_DigitsTask):
    """A 64-128-10 MLP (ReLU) on scikit-learn's digits, cross-entropy loss, shuffled minibatches.

    Args:
        seed: fixes the initial weights and the order of the minibatches.
        batch_size: minibatch size (the last batch of an epoch may be smaller).
        hidden: width of the hidden layer.
        data: a :class:`Split` to use instead of :func:`load_digits` (several tasks can share one).
    """

    name = "digits-mlp"
    description = "MLP 64-128-10 on scikit-learn's 8x8 digits (1347 train / 450 test images)"

    def __init__(
        self, seed: int = 0, batch_size: int | None = None, hidden: int = 128, data: Split | None = None
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        super().__init__(seed, batch_size, data)
        self.hidden = hidden

    def build_model(self) -> nn.Module:
        n_in = self.data.x_train.shape[1]
        n_out = int(self.data.y_train.max()) + 1
        return nn.Sequential(nn.Linear(n_in, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_out))


class DigitsCNN(_DigitsTask):
    """A small CNN on the digits as 1x8x8 images: conv 3x3 (16) - ReLU - conv 3x3 (32) - ReLU - max-pool 2 - linear.

    Same data, minibatches and metrics as :class:`DigitsMLP`; about 21k parameters in six tensors.
    """

    name = "digits-cnn"
    description = "CNN conv16-conv32-pool-linear on scikit-learn's 8x8 digits (1347 train / 450 test images)"

    def build_model(self) -> nn.Module:
        n_out = int(self.data.y_train.max()) + 1
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, n_out),
        )
