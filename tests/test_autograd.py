"""BitLinearFunction and the bitnet_fast:: custom ops: values and STE gradients equal kernels.reference.ste_linear."""

import pytest
import torch
from bitnet_fast.kernels import reference
from hypothesis import given
from hypothesis import strategies as st

from bitnet_fast import kernels
from bitnet_fast.autograd import (
    BitLinearFunction,
    bitlinear_inference,
    bitlinear_train,
    pack_weight,
    transpose_packed,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _fmt() -> str:
    return kernels.pack(torch.ones(1, 1)).format


def _tols(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def _reference_grads(x, w, b, gy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = reference.ste_linear(x, w, b)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    return y, grads


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_ste_matches_reference(lead, k, n, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).requires_grad_() if bias else None
    y = bitlinear_train(x, w, pack_weight(w, _fmt()), b)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    y_ref, grads_ref = _reference_grads(x, w, b, gy)
    assert y.dtype == dtype and y.shape == (*lead, n)
    torch.testing.assert_close(y, y_ref, **_tols(dtype))
    for got, want, name in zip(grads, grads_ref, ("x", "w", "b"), strict=False):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, want, **_tols(dtype), msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", ["function", "op"])
def test_function_and_op_match_reference(bias, path):
    """BitLinearFunction.apply (eager path) and the custom op with its registered autograd (compiled path)."""
    torch.manual_seed(0)
    x = torch.randn(5, 70, requires_grad=True)
    w = torch.randn(9, 70, requires_grad=True)
    b = torch.randn(9, requires_grad=True) if bias else None
    pw = pack_weight(w, _fmt())
    fn = BitLinearFunction.apply if path == "function" else torch.ops.bitnet_fast.ste_linear
    y, xq, s = fn(x, w, pw.data, pw.gamma, b, 9, 70, pw.format)
    assert xq.dtype == torch.int8 and s.shape == (5,)
    gy = torch.randn(y.shape)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    y_ref, grads_ref = _reference_grads(x, w, b, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads, grads_ref, rtol=1e-4, atol=1e-4)


@given(
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    n=st.integers(1, 140),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    path=st.sampled_from(["function", "op"]),
    seed=st.integers(0, 2**16),
)
def test_int8_grad_input_matches_its_reference(m, k, n, bias, dtype, path, seed):
    """With the packed transpose, dx is reference.grad_input_int8 exactly (both paths); y, dW and db are the exact
    STE's; and dx is within the int8 rounding of dy (per row) of the exact dx."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).requires_grad_() if bias else None
    pw = pack_weight(w, _fmt())
    fn = BitLinearFunction.apply if path == "function" else torch.ops.bitnet_fast.ste_linear
    y = fn(x, w, pw.data, pw.gamma, b, n, k, pw.format, transpose_packed(pw).data)[0]
    gy = torch.randn(y.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    y_ref, grads_ref = _reference_grads(x, w, b, gy)
    wt, gamma = reference.weight_quant(w.detach())
    assert torch.equal(grads[0], reference.grad_input_int8(gy, wt, gamma).to(dtype))
    torch.testing.assert_close(y, y_ref, **_tols(dtype))
    for got, want in zip(grads[1:], grads_ref[1:], strict=True):
        torch.testing.assert_close(got, want, **_tols(dtype))
    if dtype == torch.float32:  # |dx - exact| <= gamma * sum_n |Wt[n, k]| * (half an int8 step of dy's row)
        half_step = gy.abs().amax(1, keepdim=True) * (0.5 / 127)  # (M, 1)
        bound = gamma * half_step * wt.abs().float().sum(0) * 1.001 + 1e-6  # (M, K)
        assert ((grads[0] - grads_ref[0]).abs() <= bound).all()


def test_strided_and_empty_inputs():
    w = torch.randn(6, 64, requires_grad=True)
    pw = pack_weight(w, _fmt())
    x = torch.randn(5, 128)[:, ::2].requires_grad_()  # rows are strided views
    y = bitlinear_train(x, w, pw)
    y.sum().backward()
    x2 = x.detach().contiguous().requires_grad_()
    reference.ste_linear(x2, w.detach()).sum().backward()
    torch.testing.assert_close(y, reference.ste_linear(x.detach().contiguous(), w.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad)
    empty = torch.zeros(0, 64, requires_grad=True)
    assert bitlinear_train(empty, w, pw).shape == (0, 6) and bitlinear_inference(empty, pw).shape == (0, 6)


def test_only_needed_grads(monkeypatch):
    """x without requires_grad: the backward never computes grad_input (the kernel is not called at all)."""
    calls = []
    real = kernels.grad_input
    monkeypatch.setattr(kernels, "grad_input", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(4, 16, requires_grad=True)
    for x_needs_grad in (False, True):
        x = torch.randn(3, 16, requires_grad=x_needs_grad)
        y = bitlinear_train(x, w, pack_weight(w, _fmt()))
        (gw,) = torch.autograd.grad(y.sum(), [w])
        assert gw.shape == w.shape
        assert len(calls) == int(x_needs_grad)  # the True pass shows the counter sees a real call


def test_inference_matches_train_forward():
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 3, 50), torch.randn(7, 50), torch.randn(7)
    pw = pack_weight(w, _fmt())
    torch.testing.assert_close(bitlinear_inference(x, pw, b), bitlinear_train(x, w, pw, b), rtol=1e-5, atol=1e-5)


def test_packed_backward_is_a_clear_error():
    x = torch.randn(2, 16, requires_grad=True)
    y = bitlinear_inference(x, pack_weight(torch.randn(4, 16), _fmt()))
    with pytest.raises(RuntimeError, match=r"packed \(inference-only\)"):
        y.sum().backward()


def test_nonfinite_row_gives_nan_row():
    x = torch.randn(3, 20)
    x[1, 4] = float("inf")
    w = torch.randn(5, 20)
    y = bitlinear_train(x, w, pack_weight(w, _fmt()))
    assert y[1].isnan().all() and y[[0, 2]].isfinite().all()


def test_opcheck_custom_ops():
    """Schemas, fake (meta) kernels and autograd registrations agree with the real kernels."""
    torch.manual_seed(2)
    fmt = _fmt()
    x, w, b = torch.randn(3, 40), torch.randn(6, 40), torch.randn(6)
    pw = pack_weight(w, fmt)
    xq, s = kernels.quantize_activations(x)
    gy = torch.randn(3, 6)
    ops = torch.ops.bitnet_fast
    cases = [
        (ops.pack_weight, (w, fmt)),
        (ops.quantize_activations, (x,)),
        (ops.bitlinear, (x, pw.data, pw.gamma, b, 6, 40, fmt)),
        (ops.grad_input, (gy, pw.data, pw.gamma, 6, 40, fmt)),
        (ops.grad_weight, (gy, xq, s)),
        (ops.ste_linear, (x.requires_grad_(), w.requires_grad_(), pw.data, pw.gamma, b, 6, 40, fmt)),
        (ops.ste_linear, (x, w, pw.data, pw.gamma, b, 6, 40, fmt, transpose_packed(pw).data)),
        (ops.transpose_packed, (pw.data, pw.gamma, 6, 40, fmt)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_inputs_are_clear_errors():
    w = torch.randn(4, 16)
    pw = pack_weight(w, _fmt())
    with pytest.raises(ValueError, match="K=15"):
        bitlinear_train(torch.randn(2, 15), w, pw)
    with pytest.raises(TypeError, match="dtype"):
        bitlinear_inference(torch.ones(2, 16, dtype=torch.int32), pw)
    with pytest.raises(ValueError, match="format"):
        pack_weight(w, "i3")
