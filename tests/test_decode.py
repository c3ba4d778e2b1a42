"""The whole-model CPU runtime (bitnet_fast.decode): same logits and tokens as the torch model it was built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bitnet_fast.kernels import cpu_model, reference
from hypothesis import given
from hypothesis import strategies as st

from bitnet_fast.decode import PackedDecoder
from bitnet_fast.model import ModelConfig, build_model
from bitnet_fast.nn import convert, pack_model


def _lm(mlp="swiglu", kv=None, subln=False, seed=0):
    """A packed LM whose logits spread (large init), so that greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=64, hidden=96, max_seq_len=48,
                                    mlp=mlp, n_kv_head=kv)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    if subln:  # SubLN before the attention output and MLP down projections (BitNet b1.58 2B4T)
        for block in model.blocks:
            for lin in (block.attn.wo, block.mlp.down):
                lin.norm = torch.nn.RMSNorm(lin.in_features, eps=1e-6)
                torch.nn.init.uniform_(lin.norm.weight, 0.5, 1.5)
    return pack_model(model)


def _teacher_forced(dec: PackedDecoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    dec.reset()
    out = [dec.forward(ids[:prompt].tolist())]
    out += [dec.forward([t]) for t in ids[prompt:].tolist()]
    return torch.stack(out)  # logits after positions prompt-1, prompt, ...


@pytest.mark.parametrize(("mlp", "kv", "subln"), [("swiglu", None, False), ("swiglu", 2, False),
                                                  ("relu2", 1, False), ("swiglu", 2, True)])
def test_lm_logits_and_greedy_tokens_match_the_torch_model(mlp, kv, subln):
    model = _lm(mlp, kv, subln)
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids[None])[0][0, 4:]  # (16, V)
    dec = PackedDecoder.from_model(model, head="fp32")
    torch.testing.assert_close(_teacher_forced(dec, ids, 5), want, rtol=1e-4, atol=1e-4)
    greedy = model.generate(ids[None, :5], 30, temperature=0)[0, 5:].tolist()
    assert len(set(greedy)) > 3  # a real sequence, not one repeated token
    assert list(dec.generate(ids[:5].tolist(), 30)) == greedy


def test_hugging_face_llama_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.5)
    model = convert(transformers.LlamaForCausalLM(cfg), pack=True).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        want = model(ids).logits[0, 4:]
        greedy = model.generate(ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=20,
                                do_sample=False)[0, 5:].tolist()
    dec = PackedDecoder.from_model(model, head="fp32")
    torch.testing.assert_close(_teacher_forced(dec, ids[0], 5), want, rtol=1e-4, atol=1e-4)
    assert list(dec.generate(ids[0, :5].tolist(), 20)) == greedy


@given(n=st.integers(1, 70), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_int8_head_is_bit_exact(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=g), torch.randn(k, generator=g) * 10.0 ** float(torch.randint(-3, 4, (1,)))
    wq, scale = reference.int8_quant_rows(w)
    wp = cpu_model.pad_rows(wq.numpy())
    got = torch.from_numpy(cpu_model.int8_gemv(x.numpy(), wp, scale.numpy(), 2))
    assert torch.equal(got, reference.int8_linear(x, wq, scale))
    x[0] = float("nan")
    assert np.isnan(cpu_model.int8_gemv(x.numpy(), wp, scale.numpy(), 2)).all()
    assert reference.int8_linear(x, wq, scale).isnan().all()


def test_int8_head_and_embedding_stay_close_and_are_smaller():
    model = _lm()
    fp, q8 = PackedDecoder.from_model(model, head="fp32"), PackedDecoder.from_model(model, "int8", embedding_int8=True)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(2))
    a, b = _teacher_forced(fp, ids, 3), _teacher_forced(q8, ids, 3)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert q8.nbytes < fp.nbytes


def test_bad_input_says_what_to_fix():
    model = _lm()
    dec = PackedDecoder.from_model(model, head="fp32", max_len=8)
    with pytest.raises(ValueError, match="empty"):
        list(dec.generate([], 3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.forward([97])
    with pytest.raises(ValueError, match="temperature"):
        list(dec.generate([1], 3, temperature=-1.0))
    assert len(list(dec.generate([1, 2, 3], 50))) == 6  # stops when the 8-token context is full
    with pytest.raises(ValueError, match="context is full"):
        dec.forward([1])
    with pytest.raises(ValueError, match="head="):
        PackedDecoder.from_model(model, head="int4")
    import copy
    import pickle

    for clone in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            clone(dec)
    with pytest.raises(TypeError, match="BitLinear"):
        PackedDecoder.from_model(build_model(ModelConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=32, hidden=64,
                                                         max_seq_len=16, linear="fp")))


def test_vectorized_exp_matches_float64_exp_over_its_whole_range():
    """The softmax's and SwiGLU's exp: relative error < 2e-7 on [-87, 88], clamped outside (finite, no wrap-around
    of the exponent bits); the shift is subtracted in fp32 first, and the sum is returned."""
    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001), [-87.5, -100.0, -1e30, 0.0, 88.5, 100.0, 1e30]])
    y = x.astype(np.float32)
    cpu_model._exp_shifted(y, y.size, np.float32(0.0), np.empty(y.size, np.int32))
    x32 = x.astype(np.float32)
    with np.errstate(over="ignore"):  # the reference overflows to inf at 1e30; ours clamps
        want = np.exp(x32.astype(np.float64))
    inside = (x32 >= -87.0) & (x32 <= 88.0)
    assert np.max(np.abs(y[inside] - want[inside]) / want[inside]) < 2e-7
    assert np.all((y[x32 < -87.0] >= 0) & (y[x32 < -87.0] < 2e-38))
    assert np.all(np.isfinite(y)) and np.all(y[x32 > 88.0] > 1e38)
    scores = np.linspace(-20.0, 3.5, 1001).astype(np.float32)  # softmax use: exp(scores - max) and its sum
    p = scores.copy()
    total = cpu_model._exp_shifted(p, p.size, np.float32(3.5), np.empty(p.size, np.int32))
    want = np.exp((scores - np.float32(3.5)).astype(np.float64))
    np.testing.assert_allclose(p, want, rtol=2e-7)
    assert total == pytest.approx(float(want.sum()), rel=1e-6)


@pytest.mark.parametrize("m", [1, 7, 1100])
def test_swiglu_activation_matches_silu_times_up(m):
    """_activate's silu(gate) * up (vectorized exp, blocks of 512 per thread) against torch, to fp32 rounding."""
    rng = np.random.default_rng(m)
    gate = (rng.standard_normal((m, 300)) * 20).astype(np.float32)
    up = rng.standard_normal((m, 300)).astype(np.float32)
    want = torch.nn.functional.silu(torch.from_numpy(gate).double()) * torch.from_numpy(up).double()
    cpu_model._activate(gate, up, True, 2)
    torch.testing.assert_close(torch.from_numpy(up).double(), want, rtol=1e-6, atol=1e-30)


@given(d=st.sampled_from([1, 3, 4, 6, 16]), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       m=st.integers(1, 3), pos=st.integers(0, 9), seed=st.integers(0, 2**32 - 1))
def test_attention_matches_softmax_attention_for_any_head_dim_and_length(d, hkv, group, m, pos, seed):
    """cpu_model._attention (four dims / four positions per pass, then the remainder) against plain causal softmax
    attention with grouped KV heads: head dims and lengths that are and are not multiples of 4, down to one position."""
    rng = np.random.default_rng(seed)
    n_head, t_max = hkv * group, pos + m + 2
    q = rng.standard_normal((m, n_head * d)).astype(np.float32)
    k = rng.standard_normal((hkv, t_max, d)).astype(np.float32)
    v = rng.standard_normal((hkv, t_max, d)).astype(np.float32)
    out = np.full((m, n_head * d), np.nan, np.float32)
    cpu_model._attention(q, np.ascontiguousarray(k.transpose(0, 2, 1)), v, pos, n_head, out)
    for r in range(m):
        for h in range(n_head):
            g, n = h // group, pos + r + 1
            s = k[g, :n].astype(np.float64) @ q[r, h * d:(h + 1) * d] / np.sqrt(d)
            p = np.exp(s - s.max())
            want = p @ v[g, :n] / p.sum()
            np.testing.assert_allclose(out[r, h * d:(h + 1) * d], want, rtol=1e-4, atol=1e-5)
