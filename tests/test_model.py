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
    (lf, loss_f), (lb, loss_b) = fp(idx, idx), bit(idx, idx)
    assert lf.shape == lb.shape == (2, 16, 97) and loss_f.ndim == 0
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
