"""Kahan-compensated low-precision parameters (``kahan_summation=True``) against torch-optimi's ``kahan_sum``."""

from __future__ import annotations

import io

import pytest
import torch

import gradstep


def _pair(seed: int = 0, n: int = 1000) -> torch.Tensor:
    torch.manual_seed(seed)
    return (torch.randn(n) * 10).bfloat16()


def test_sgd_matches_optimi_kahan_sum_bit_for_bit() -> None:
    """200 steps of SGD on bf16 parameters: parameters and compensation buffers equal to torch-optimi's, bit for
    bit. The lr is a power of two: optimi's bf16 kernels round ``lr * g`` once, from a bf16 ``g``, and so does the
    core from its float32 product, which is then exact."""
    optimi = pytest.importorskip("optimi")
    p0 = _pair()
    ours, theirs = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt = gradstep.SGD([ours], lr=2**-10, kahan_summation=True)
    ref = optimi.SGD([theirs], lr=2**-10, kahan_sum=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        grad = torch.randn(p0.shape, generator=g).bfloat16()
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(opt.state[ours]["kahan_comp"], ref.state[theirs]["kahan_comp"])
    assert opt.state[ours]["kahan_comp"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_compensation_keeps_small_updates(name: str) -> None:
    """Updates far below a bf16 ULP vanish from plain bf16 parameters; compensated ones track an fp32 copy."""
    p0 = _pair(2)
    kahan, plain, master = (
        torch.nn.Parameter(p0.clone()),
        torch.nn.Parameter(p0.clone()),
        torch.nn.Parameter(p0.float()),
    )
    cls = getattr(gradstep, name)
    opts = [cls([kahan], lr=1e-4, kahan_summation=True), cls([plain], lr=1e-4), cls([master], lr=1e-4)]
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        grad = torch.randn(p0.shape, generator=g) + 0.5
        for p, opt in zip((kahan, plain, master), opts):
            p.grad = grad.to(p.dtype)
            opt.step()
    held = kahan.float() + opts[0].state[kahan]["kahan_comp"].float()
    err_kahan = (held - master).abs().mean()
    err_plain = (plain.float() - master).abs().mean()
    assert err_kahan < err_plain / 20


def test_fp32_parameters_keep_no_compensation_and_state_round_trips() -> None:
    low, full = torch.nn.Parameter(_pair(4)), torch.nn.Parameter(torch.randn(5))
    opt = gradstep.AdamW([low, full], lr=1e-3, kahan_summation=True)
    for p in (low, full):
        p.grad = torch.ones_like(p)
    opt.step()
    assert "kahan_comp" in opt.state[low] and "kahan_comp" not in opt.state[full]
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in (low, full)]
    other = gradstep.AdamW(copies, lr=1e-3, kahan_summation=True)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.state[copies[0]]["kahan_comp"], opt.state[low]["kahan_comp"])
    sd = opt.state_dict()
    sd["state"][0]["kahan_comp"] = sd["state"][0]["kahan_comp"][:3]
    with pytest.raises(ValueError, match=r"params'\]\[0\]: kahan_comp has shape"):
        other.load_state_dict(sd)


def test_sparse_gradients_refuse_kahan_summation() -> None:
    w = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    opt = gradstep.Adagrad([w], lr=0.1, kahan_summation=True)
    w.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 3, dtype=torch.bfloat16), (4, 3))
    with pytest.raises(RuntimeError, match="kahan_summation"):
        opt.step()
