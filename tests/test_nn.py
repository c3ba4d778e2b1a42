"""BitLinear (latent and packed modes, cache, state_dict), convert/pack_model, training, torch.compile."""

import gc
import weakref

import pytest
import torch
from bitnet_fast.kernels import reference
from torch import nn

import bitnet_fast
from bitnet_fast import kernels
from bitnet_fast.nn import GRAD_INPUTS, BitLinear, convert, pack_model, set_grad_input, unpack_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 64, bias=False), nn.GELU(), nn.Linear(64, 5))


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _oracle(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """BitLinear's forward computed apart from the kernels: float64 F.linear of the dequantized operands, quantized
    by kernels/reference.py (whose quantizers the Numba ones equal bit for bit, tests/test_packing.py and
    test_kernels_cpu.py). The kernels compute acc * gamma / s in fp32, a few roundings from this."""
    xq, s = reference.act_quant(x.reshape(-1, x.shape[-1]))
    wt, gamma = reference.weight_quant(w)
    y = nn.functional.linear(xq.double() / s.double()[:, None], wt.double() * gamma.double(),
                             None if bias is None else bias.double())
    return y.reshape(*x.shape[:-1], w.shape[0])


# ------------------------------------------------------------------------------------------------ the module
def test_constructor_like_linear():
    m = BitLinear(10, 3, bias=False, dtype=torch.bfloat16)
    assert m.weight.shape == (3, 10) and m.weight.dtype == torch.bfloat16 and m.bias is None
    assert "mode=latent" in repr(m) and "subln=False" in repr(m)
    assert isinstance(BitLinear(10, 3, subln=True).norm, nn.RMSNorm)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="in_features"):
            BitLinear(bad, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("subln", [False, True])
def test_module_matches_reference(dtype, subln):
    torch.manual_seed(0)
    m = BitLinear(48, 20, subln=subln, dtype=dtype)
    x = torch.randn(2, 3, 48, dtype=dtype, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), m.weight.detach().clone().requires_grad_()
    h = nn.functional.rms_norm(x2, (48,), eps=1e-6) if subln else x2
    y2 = reference.ste_linear(h, w2, m.bias.detach())
    y2.square().sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(m.weight.grad, w2.grad, **tol)


def test_pack_cache_follows_weight_version(monkeypatch):
    calls = []
    real_pack = kernels.pack
    monkeypatch.setattr(kernels, "pack", lambda *a, **k: calls.append(1) or real_pack(*a, **k))
    m = BitLinear(32, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(4, 32)
    for _ in range(3):  # gradient accumulation: the weight does not change, one pack
        m(x).sum().backward()
    assert len(calls) == 1
    before = m.packed_weight
    opt.step()  # in-place update bumps weight._version
    after = m.packed_weight
    assert after is not before and len(calls) == 2
    torch.testing.assert_close(after.gamma, kernels.quantize_weight(m.weight.detach())[1])
    with torch.no_grad():
        m.weight.mul_(-1)
    assert torch.equal(kernels.unpack(m.packed_weight)[0], -kernels.unpack(after)[0]) and len(calls) == 3
    m.load_state_dict({"weight": torch.randn(8, 32), "bias": torch.zeros(8)})
    torch.testing.assert_close(m.packed_weight.gamma, kernels.quantize_weight(m.weight.detach())[1])


def test_cache_filled_under_inference_mode_still_trains():
    m = BitLinear(32, 8)
    x = torch.randn(2, 32, requires_grad=True)
    with torch.inference_mode():
        m(x.detach())
    m(x).sum().backward()  # the cached packing must not be an inference tensor
    assert m.weight.grad.shape == (8, 32)


def test_pack_frees_latent_weight_and_matches():
    torch.manual_seed(0)
    m = BitLinear(256, 64)
    x = torch.randn(5, 256)
    want = _oracle(x, m.weight.detach(), m.bias.detach())
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=1e-6)  # latent: the cached packing
    w_ref = weakref.ref(m.weight)
    m.pack()
    gc.collect()
    assert w_ref() is None and m.weight is None and not m.training
    assert m.packed_weight.data.numel() * 8 == 2 * 256 * 64  # 2 bits per weight (K is a multiple of 128)
    assert "mode=packed" in repr(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x).double(), want, rtol=2e-6, atol=1e-6)  # packed: the stored packing


def test_packed_is_inference_only_and_unpacks():
    torch.manual_seed(0)
    m = BitLinear(40, 12).pack()
    x = torch.randn(3, 40)
    y = m(x)
    with pytest.raises(RuntimeError, match="packed"):
        m.train()
    with pytest.raises(RuntimeError, match="packed"):
        m(x.requires_grad_()).sum().backward()
    m.unpack()
    assert m.weight is not None and m.weight.requires_grad
    m.train()
    torch.testing.assert_close(m(x.detach()), y, rtol=1e-5, atol=1e-5)  # same ternary matrix and scale


def test_state_dict_round_trips_both_modes():
    torch.manual_seed(0)
    src = BitLinear(40, 12)
    x = torch.randn(3, 40)
    with torch.no_grad():
        y = src(x)
    torch.testing.assert_close(y.double(), _oracle(x, src.weight.detach(), src.bias.detach()), rtol=2e-6, atol=1e-6)
    latent = src.state_dict()
    dst = BitLinear(40, 12)
    dst.load_state_dict(latent)
    assert torch.equal(dst.weight, src.weight)
    packed = src.pack().state_dict()
    assert {"bias", "packed.data", "packed.gamma", "packed.header"} == set(packed)
    for target in (BitLinear(40, 12), BitLinear(40, 12).pack()):  # a latent module becomes packed
        target.load_state_dict(packed)
        assert target.is_packed
        with torch.no_grad():
            torch.testing.assert_close(target(x), y)
    back = BitLinear(40, 12).pack()
    back.load_state_dict(latent)  # a latent checkpoint makes a packed module latent again
    assert not back.is_packed and torch.equal(back.weight, latent["weight"])


def test_bad_packed_state_dict_is_clear():
    packed = BitLinear(40, 12).pack().state_dict()
    with pytest.raises(ValueError, match=r"\(out, in\)=\(12, 40\).*\(12, 41\)"):
        BitLinear(41, 12).load_state_dict(packed)
    bad = dict(packed, **{"packed.header": packed["packed.header"].clone()})
    bad["packed.header"][0] = 99
    with pytest.raises(ValueError, match="layout version 99"):
        BitLinear(40, 12).load_state_dict(bad)
    bad = dict(packed, **{"packed.data": packed["packed.data"][:, :-1]})
    with pytest.raises(ValueError, match="truncated"):
        BitLinear(40, 12).load_state_dict(bad)


# --------------------------------------------------------------------------------------------- whole models
def test_convert_swaps_linears_and_skips():
    model = _mlp()
    w0 = model[0].weight
    out = convert(model, skip=("4",))
    assert out is model and isinstance(model[0], BitLinear) and isinstance(model[2], BitLinear)
    assert type(model[4]) is nn.Linear
    assert model[0].weight is w0  # Parameters are shared, so optimizer state carries over
    assert model[2].bias is None

    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    odd = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2), "lora": Lora(4, 4)})
    convert(odd)
    assert type(odd["mha"].out_proj) is not BitLinear and type(odd["lora"]) is Lora
    assert isinstance(convert(nn.Linear(3, 4)), BitLinear)
    with pytest.raises(TypeError, match="skip"):
        convert(_mlp(), skip="lm_head")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert("model")


def test_convert_keeps_dtype_and_pack_model():
    model = convert(_mlp().to(torch.bfloat16), pack=True)
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 3 and all(m.is_packed for m in layers)
    y = model(torch.randn(2, 24, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.isfinite().all()
    unpack_model(model)
    assert all(m.weight.dtype == torch.bfloat16 for m in layers)
    assert bitnet_fast.pack_model is pack_model and bitnet_fast.convert is convert


def test_tiny_mlp_trains():
    torch.manual_seed(0)
    model = convert(_mlp(), skip=())
    x = torch.randn(256, 24)
    target = (x[:, :5] * 2).sin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tiny_llama_trains_generates_and_packs():
    model = convert(_tiny_llama())
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.layers[0].mlp.up_proj, BitLinear)
    g = torch.Generator().manual_seed(0)
    step = torch.randint(1, 5, (64, 1), generator=g)
    data = (torch.arange(17) * step + torch.randint(0, 128, (64, 1), generator=g)) % 128  # (64, 17) progressions
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        batch = data[torch.randint(0, 64, (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    model.eval()
    prompt = data[:2, :4]
    with torch.no_grad():
        latent = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        pack_model(model)
        packed = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert latent.shape == (2, 10) and torch.equal(latent, packed)


# ------------------------------------------------------------------------------------------------ compile
def test_int8_grad_input_module(monkeypatch):
    """grad_input="int8": dx is reference.grad_input_int8 of the current weight (the transpose is re-made when the
    weight changes, once per version), dW and y are the exact mode's; bad modes name the argument."""
    torch.manual_seed(3)
    exact, fast = BitLinear(70, 20), BitLinear(70, 20, grad_input="int8")
    fast.load_state_dict(exact.state_dict())
    assert "grad_input=int8" in repr(fast) and "grad_input" not in repr(exact)
    calls = []
    real = kernels.transpose_packed
    monkeypatch.setattr(kernels, "transpose_packed", lambda pw: calls.append(1) or real(pw))
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    for step in range(2):
        x = torch.randn(2, 5, 70, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        gy = torch.randn(2, 5, 20)
        fast(x).backward(gy)
        exact(x2).backward(gy)
        wt, gamma = reference.weight_quant(fast.weight.detach())
        assert torch.equal(x.grad, reference.grad_input_int8(gy.reshape(10, 20), wt, gamma).reshape(2, 5, 70))
        torch.testing.assert_close(fast.weight.grad, exact.weight.grad)
        assert len(calls) == step + 1
        fast(x.detach()).sum().backward()  # same weight version: no new transpose; no grad to x: none used
        assert len(calls) == step + 1
        opt.step()
        with torch.no_grad():
            exact.weight.copy_(fast.weight)
        opt.zero_grad()
        exact.zero_grad()
    with torch.no_grad():
        fast(torch.randn(3, 70))  # inference: no transpose
    assert len(calls) == 2
    with pytest.raises(ValueError, match="grad_input='fp8'"):
        BitLinear(4, 4, grad_input="fp8")
    with pytest.raises(ValueError, match="grad_input"):
        convert(_mlp(), grad_input="bf16")
    model = set_grad_input(convert(_mlp(), skip=()), "int8")
    assert {m.grad_input for m in model.modules() if isinstance(m, BitLinear)} == {"int8"}


@pytest.mark.parametrize("grad_input", GRAD_INPUTS)
def test_compile_training_matches_eager_without_graph_breaks(grad_input):
    torch.manual_seed(0)
    model = convert(_mlp(), skip=(), grad_input=grad_input)
    x = torch.randn(6, 24)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    y = model(x)
    y.square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y2 = compiled(x)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y)
    for a, p in zip(eager, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)
    pack_model(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), y.detach())


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    torch.manual_seed(0)
    model = convert(_mlp(), skip=())
    x = torch.randn(6, 24)
    y = model(x)
    y.sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y2 = torch.compile(model, fullgraph=True)(x)
    y2.sum().backward()
    torch.testing.assert_close(y2, y)
    for a, p in zip(eager, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)


def test_tiny_llama_compiles_without_graph_breaks_and_matches_eager():
    """A converted Hugging Face LlamaForCausalLM: one graph, no breaks, and the compiled model (aot_eager) gives
    eager's logits, and in training eager's gradients, in latent and packed mode."""
    model = convert(_tiny_llama())
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for mode in ("latent", "packed"):
        if mode == "packed":
            pack_model(model)
        with torch.set_grad_enabled(mode == "latent"):
            explain = torch._dynamo.explain(model)(input_ids=ids)
            assert (explain.graph_count, explain.graph_break_count) == (1, 0), (mode, explain.break_reasons)
            torch._dynamo.reset()
            eager = model(input_ids=ids, labels=ids)
            if mode == "latent":
                eager.loss.backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                model.zero_grad()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids)
            torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
            if mode == "latent":
                compiled.loss.backward()
                assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
                for n, p in model.named_parameters():
                    torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
