"""The fused head + cross-entropy (bitnet_fast/loss.py) against torch's unfused one: loss and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_fast import loss as fused
from bitnet_fast.model import ModelConfig, build_model


def _unfused(h, w, t, reduction="mean"):
    return F.cross_entropy((h @ w.T).float(), t, reduction=reduction)


def _grads(fn, h, w, t, scale=1.0):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, t)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), c=st.integers(1, 24), v=st.integers(2, 300), chunk_rows=st.integers(1, 16),
       reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**16))
def test_matches_unfused_cross_entropy_for_any_shape_and_chunking(n, c, v, chunk_rows, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, c, generator=g) * 3, torch.randn(v, c, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    old = dict(fused.CHUNK_BYTES)
    fused.CHUNK_BYTES["cpu"] = chunk_rows * 4 * v  # force chunk_rows rows per chunk (several chunks, a ragged last)
    try:
        got = _grads(lambda *a: fused.linear_cross_entropy(*a, reduction=reduction), h, w, t, scale=0.7)
    finally:
        fused.CHUNK_BYTES.update(old)
    want = _grads(lambda *a: _unfused(*a, reduction=reduction), h, w, t, scale=0.7)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_the_needed_gradient_is_computed_and_no_grad_gives_the_loss():
    h, w, t = torch.randn(33, 8), torch.randn(50, 8), torch.randint(0, 50, (33,))
    wg = w.clone().requires_grad_()
    fused.linear_cross_entropy(h, wg, t).backward()  # h needs none
    torch.testing.assert_close(wg.grad, _grads(_unfused, h, w, t)[2])
    hg = h.clone().requires_grad_()
    fused.linear_cross_entropy(hg, w, t, reduction="sum").backward()
    torch.testing.assert_close(hg.grad, _grads(lambda *a: _unfused(*a, reduction="sum"), h, w, t)[1])
    with torch.no_grad():
        out = fused.linear_cross_entropy(hg, wg, t)
    assert not out.requires_grad
    torch.testing.assert_close(out, _unfused(h, w, t))


def test_bf16_inputs_follow_torch_with_fp32_logits():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(40, 16, generator=g).bfloat16(), torch.randn(64, 16, generator=g).bfloat16()
    t = torch.randint(0, 64, (40,), generator=g)
    got, want = _grads(fused.linear_cross_entropy, h, w, t), _grads(_unfused, h, w, t)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_bad_arguments_are_named():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="reduction"):
        fused.linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match=r"h \(N, C\), weight \(V, C\), targets \(N,\)"):
        fused.linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="at least one row"):
        fused.linear_cross_entropy(h[:0], w, t[:0])


@pytest.mark.parametrize("linear", ["fp", "bitnet"])
def test_model_loss_and_every_gradient_match_the_unfused_head(linear):
    """The tied head's weight gets the embedding's gradient plus the head's, as with the unfused loss."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, hidden=64, max_seq_len=32, linear=linear)
    model = build_model(cfg)
    idx, tgt = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    _, loss = model(idx, tgt)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(idx)
    want_loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
