"""The LLaMA-style LM: presets, BitNet vs fp twin, causality, RoPE, generation, bad configs."""

from __future__ import annotations

import pytest
import torch

from bitnet_fast.model import (
    LM,
    PRESETS,
    ModelConfig,
    apply_rope,
    build_model,
    count_parameters,
    preset_config,
    rope_table,
)
from bitnet_fast.nn import BitLinear

TINY = dict(vocab_size=97, n_layer=2, n_head=2, n_embd=32, hidden=64, max_seq_len=16)


@pytest.mark.parametrize(("preset", "lo", "hi"), [("small", 6.5e6, 7.5e6), ("medium", 52e6, 60e6),
                                                   ("large", 115e6, 125e6)])
def test_preset_sizes_with_the_default_tokenizer(preset, lo, hi):
    with torch.device("meta"):  # count without allocating
        n = {lin: count_parameters(LM(preset_config(preset, linear=lin))) for lin in ("fp", "bitnet")}
    assert n["fp"] == n["bitnet"] and lo <= n["fp"] <= hi


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ValueError, match="linear"):
        ModelConfig(linear="int4")
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(n_embd=30, n_head=4)
    assert set(PRESETS) == {"tiny", "small", "medium", "large"}


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_twins_differ_only_in_linear_layers(mlp):
    torch.manual_seed(0)
    fp = build_model(ModelConfig(**TINY, mlp=mlp, linear="fp"))
    bit = build_model(ModelConfig(**TINY, mlp=mlp, linear="bitnet"))
    assert {k: v.shape for k, v in fp.state_dict().items()} == {k: v.shape for k, v in bit.state_dict().items()}
    bit.load_state_dict(fp.state_dict())
    kinds = {type(m) for m in bit.modules() if isinstance(m, (BitLinear, torch.nn.Linear))}
    assert kinds == {BitLinear, torch.nn.Linear}  # BitLinear in blocks; the (tied) head stays full precision
    assert bit.head.weight is bit.tok_emb.weight
    idx = torch.randint(0, 97, (2, 16))
    (lf, _), (lb, _) = fp(idx), bit(idx)
    (none_f, loss_f), (none_b, loss_b) = fp(idx, idx), bit(idx, idx)
    assert lf.shape == lb.shape == (2, 16, 97) and loss_f.ndim == 0 and none_f is None and none_b is None
    assert not torch.allclose(lf, lb)  # ternary weights change the function
    loss_b.backward()
    assert all(p.grad is not None for p in bit.parameters())


@pytest.mark.parametrize("linear", ["fp", "bitnet"])
def test_causal(linear):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, linear=linear)).eval()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


def test_rope_rotates_without_changing_norms():
    cos, sin = rope_table(8, 5, 10000.0)
    x = torch.randn(1, 1, 5, 8)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0 is not rotated


def test_generate_and_length_limit():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, linear="fp")).eval()
    idx = torch.randint(0, 97, (2, 3))
    out = model.generate(idx, 20, temperature=0)
    assert out.shape == (2, 23) and torch.equal(out[:, :3], idx)
    assert torch.equal(out, model.generate(idx, 20, temperature=0))  # greedy is deterministic
    assert model.generate(idx, 4, temperature=0.8, top_k=5).shape == (2, 7)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _greedy_recompute(model, idx, n):
    """Greedy continuation that runs the whole sequence for every new token (no cache): the oracle."""
    for _ in range(n):
        idx = torch.cat((idx, model(idx)[0][:, -1:].argmax(-1)), dim=1)
    return idx


@pytest.mark.parametrize(("linear", "kv"), [("fp", None), ("bitnet", None), ("fp", 1), ("bitnet", 1)])
def test_cached_greedy_decode_equals_full_recompute(linear, kv):
    """Token for token, for fp and packed BitNet, with and without grouped-query attention."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "max_seq_len": 32}, linear=linear, n_kv_head=kv)).eval()
    if linear == "bitnet":
        from bitnet_fast.nn import pack_model

        pack_model(model)
    idx = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        want = _greedy_recompute(model, idx, 12)
    assert torch.equal(model.generate(idx, 12, temperature=0), want)


def test_cache_prefill_in_chunks_matches_one_pass():
    """Tokens fed at a position after earlier ones (T > 1 at pos > 0) see exactly the cached prefix."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, linear="fp", n_kv_head=1)).eval()
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        full = model(idx)[0]
        model.setup_cache(1)
        parts = [model(idx[:, :4], pos=0)[0], model(idx[:, 4:9], pos=4)[0], model(idx[:, 9:], pos=9)[0]]
        last = model(idx[:, :4], pos=0, last_logits=True)[0]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, full[:, 3:4], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(idx, pos=0)
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(**TINY, n_kv_head=3)
