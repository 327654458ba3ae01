"""Projected gradient descent (PGD) attacks with L2ProjectedOptim and LinfProjectedOptim, the docs' example.

A small classifier is trained on scikit-learn's bundled digits (8x8 images, offline); one perturbation per test
image is then optimised to *increase* the loss (``maximize=True``) inside an L2 or Linf ball. The perturbation
must stay in its ball, and the accuracy must collapse, while random perturbations of the same size barely hurt.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn import datasets

from gradstep.paramtransform import L2ProjectedOptim, LinfProjectedOptim


@pytest.fixture(scope="module")
def trained():
    x, y = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[:1400]), y[:1400]).backward()
        opt.step()
    model.requires_grad_(False)
    return model, x[1400:], y[1400:]


def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def pgd(model, x, y, cls, epsilon: float, lr: float, steps: int = 20) -> torch.Tensor:
    """The attack as a user writes it: the perturbation is the parameter, each image (row) has its own ball."""
    delta = torch.zeros_like(x, requires_grad=True)
    opt = cls([delta], epsilon=epsilon, lr=lr, maximize=True)  # maximize: gradient ascent on the loss
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x + delta), y).backward()
        opt.step()
    return delta.detach()


def test_l2_pgd_stays_in_each_images_ball_and_breaks_the_classifier(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.9
    eps = 1.0
    delta = pgd(model, x, y, L2ProjectedOptim, epsilon=eps, lr=0.25)
    norms = delta.norm(dim=1)
    assert float(norms.max()) <= eps * (1 + 1e-5)  # float32 rounding of torch.renorm's scale
    assert float(norms.min()) > 0.5 * eps  # the attack uses its budget
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noise = noise / noise.norm(dim=1, keepdim=True) * eps
    assert accuracy(model, x + noise, y) > clean - 0.1
    assert accuracy(model, x + delta, y) < 0.3


def test_linf_pgd_stays_in_the_box_and_breaks_the_classifier(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    eps = 0.1
    delta = pgd(model, x, y, LinfProjectedOptim, epsilon=eps, lr=0.02)
    assert bool((delta.abs() <= torch.tensor(eps, dtype=delta.dtype)).all())  # eps as a float32, as clamp uses it
    assert float(delta.abs().mean()) > 0.5 * eps
    noise = torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1))) * eps
    assert accuracy(model, x + noise, y) > clean - 0.1
    assert accuracy(model, x + delta, y) < 0.3
