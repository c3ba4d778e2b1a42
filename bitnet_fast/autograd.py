"""BitLinear autograd: the fused kernels as torch custom ops, with a straight-through-estimator backward.

Each kernel is a `torch.library.custom_op` in the `bitnet_fast` namespace with a fake (meta) implementation,
so `torch.compile` traces through BitLinear without graph breaks. Custom ops cannot take a PackedWeight, so a
packed weight travels as (data, gamma, out_features, in_features, fmt). The training op `bitnet_fast::ste_linear`
gets its gradients from `BitLinearFunction` (registered with `register_autograd`), which eager code calls directly
to skip the custom-op dispatch. Both match the DESIGN.md detach form `kernels.reference.ste_linear`:

    forward   y  = (xq @ Wt^T) * gamma / s + b          (exact int32 product, float epilogue)
    backward  dx = dy @ (Wt * gamma)      dW = dy^T @ (xq / s)      db = sum(dy)

With a transposed packed weight (BitLinear `grad_input="int8"`) dx is instead `kernels.bitlinear(dy, Wt^T)`: dy
quantized per row to int8 like an activation, times Wt exactly (`kernels.reference.grad_input_int8`; SwitchBack,
Wortsman et al. 2023, uses int8 for this product too). dW stays fp32, as the latent weights need it.
"""

# No `from __future__ import annotations`: custom_op reads the real annotations to infer the schemas.

import torch

from bitnet_fast import kernels
from bitnet_fast.kernels import PackedWeight, get_format

__all__ = ["BitLinearFunction", "bitlinear_inference", "bitlinear_train", "pack_weight", "transpose_packed"]

Tensor = torch.Tensor


def _pw(data: Tensor, gamma: Tensor, out_features: int, in_features: int, fmt: str) -> PackedWeight:
    return PackedWeight(data, gamma, (out_features, in_features), fmt)


# ------------------------------------------------------------------------------------------------ kernel ops
@torch.library.custom_op("bitnet_fast::pack_weight", mutates_args=())
def _pack_weight(w: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """Latent (N, K) float weight -> (packed data, gamma): absmean quantization + packing."""
    pw = kernels.pack(w, fmt)
    return pw.data, pw.gamma


@_pack_weight.register_fake
def _(w, fmt):
    f = get_format(fmt)
    return w.new_empty(f.data_shape(*w.shape), dtype=f.dtype), w.new_empty((), dtype=torch.float32)


@torch.library.custom_op("bitnet_fast::transpose_packed", mutates_args=())
def _transpose_packed(data: Tensor, gamma: Tensor, out_features: int, in_features: int, fmt: str) -> Tensor:
    """Packed (N, K) data -> the packed data of the (K, N) transpose (same gamma)."""
    return kernels.transpose_packed(_pw(data, gamma, out_features, in_features, fmt)).data


@_transpose_packed.register_fake
def _(data, gamma, out_features, in_features, fmt):
    return data.new_empty(get_format(fmt).data_shape(in_features, out_features))


@torch.library.custom_op("bitnet_fast::quantize_activations", mutates_args=())
def _quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) float -> (xq int8 (M, K), s fp32 (M,))."""
    return kernels.quantize_activations(x)


@_quantize_activations.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("bitnet_fast::bitlinear", mutates_args=())
def _bitlinear(
    x: Tensor, data: Tensor, gamma: Tensor, bias: Tensor | None, out_features: int, in_features: int, fmt: str
) -> Tensor:
    """Packed inference forward: (M, K) float -> (M, N) in x.dtype (activation quant fused into the matmul)."""
    return kernels.bitlinear(x, _pw(data, gamma, out_features, in_features, fmt), bias)


@_bitlinear.register_fake
def _(x, data, gamma, bias, out_features, in_features, fmt):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("bitnet_fast::grad_input", mutates_args=())
def _grad_input(grad_y: Tensor, data: Tensor, gamma: Tensor, out_features: int, in_features: int, fmt: str) -> Tensor:
    """STE grad to the input: (M, N) -> (M, K) fp32."""
    return kernels.grad_input(grad_y, _pw(data, gamma, out_features, in_features, fmt))


@_grad_input.register_fake
def _(grad_y, data, gamma, out_features, in_features, fmt):
    return grad_y.new_empty((grad_y.shape[0], in_features), dtype=torch.float32)


@torch.library.custom_op("bitnet_fast::grad_weight", mutates_args=())
def _grad_weight(grad_y: Tensor, xq: Tensor, s: Tensor) -> Tensor:
    """STE grad to the latent weight: (M, N), (M, K) int8, (M,) -> (N, K) fp32."""
    return kernels.grad_weight(grad_y, xq, s)


@_grad_weight.register_fake
def _(grad_y, xq, s):
    return grad_y.new_empty((grad_y.shape[1], xq.shape[1]), dtype=torch.float32)


@torch.library.custom_op("bitnet_fast::ste_linear", mutates_args=())
def _ste_linear(
    x: Tensor,
    weight: Tensor,
    data: Tensor,
    gamma: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    fmt: str,
    data_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (M, K) float -> (y (M, N) x.dtype, xq, s). `weight` (the latent weight) only carries
    the gradient; the product uses its packed form (data, gamma), which the caller keeps in sync. `data_t`, the
    packed transpose, selects the int8 input gradient (None: exact)."""
    return _ste_forward(x, weight, data, gamma, bias, out_features, in_features, fmt, data_t)


def _ste_forward(x, weight, data, gamma, bias, out_features, in_features, fmt, data_t=None):
    """(y, xq, s); data_t only reaches the backward (through setup_context)."""
    return kernels.bitlinear_train(x, _pw(data, gamma, out_features, in_features, fmt), bias, x.dtype)


@_ste_linear.register_fake
def _(x, weight, data, gamma, bias, out_features, in_features, fmt, data_t=None):
    m = x.shape[0]
    y = x.new_empty((m, out_features))
    return y, x.new_empty(x.shape, dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- autograd
class BitLinearFunction(torch.autograd.Function):
    """STE linear over the fused kernels: (x (M, K), latent weight (N, K), packed data, gamma, bias, N, K, fmt,
    packed transpose or None) -> (y (M, N), xq, s). Eager training calls it directly (cheaper than custom-op
    dispatch); its setup_context and backward are also the autograd of `bitnet_fast::ste_linear`, which
    torch.compile traces."""

    forward = staticmethod(_ste_forward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, data, gamma, bias, out_features, in_features, fmt, *data_t = inputs  # data_t: optional
        ctx.save_for_backward(data, gamma, output[1], output[2], *data_t)  # packed weight, xq, s[, transpose]
        ctx.n_inputs = len(inputs)
        ctx.meta = (out_features, in_features, fmt, x.dtype, weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, grad_y, *_unused):
        data, gamma, xq, s, *data_t = ctx.saved_tensors
        data_t = data_t[0] if data_t else None
        out_features, in_features, fmt, x_dtype, w_dtype, b_dtype = ctx.meta
        grad_y = grad_y.contiguous()
        traced = torch.compiler.is_compiling()  # AOTAutograd traces this: use the ops (they have fake kernels)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if data_t is not None:  # int8: dy quantized per row, times the packed transpose (K, N)
                if traced:
                    gx = torch.ops.bitnet_fast.bitlinear(grad_y, data_t, gamma, None, in_features, out_features, fmt)
                else:
                    gx = kernels.bitlinear(grad_y, _pw(data_t, gamma, in_features, out_features, fmt))
            elif traced:
                gx = torch.ops.bitnet_fast.grad_input(grad_y, data, gamma, out_features, in_features, fmt)
            else:
                gx = kernels.grad_input(grad_y, _pw(data, gamma, out_features, in_features, fmt))
            gx = gx.to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = (torch.ops.bitnet_fast.grad_weight if traced else kernels.grad_weight)(grad_y, xq, s).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[4]:
            gb = grad_y.float().sum(0).to(b_dtype)
        return (gx, gw, None, None, gb) + (None,) * (ctx.n_inputs - 5)


torch.library.register_autograd(
    "bitnet_fast::ste_linear", BitLinearFunction.backward, setup_context=BitLinearFunction.setup_context
)


def _packed_backward(ctx, grad_y):
    raise RuntimeError(
        "BitLinear is packed (inference-only) and cannot be trained or backpropagated through; "
        "call .unpack() on it (or convert() a full-precision model) to train"
    )


torch.library.register_autograd("bitnet_fast::bitlinear", _packed_backward)


# ------------------------------------------------------------------------------------------------ entry points
def pack_weight(w: Tensor, fmt: str) -> PackedWeight:
    """Quantize + pack a latent (N, K) weight via the custom op (traceable by torch.compile)."""
    data, gamma = torch.ops.bitnet_fast.pack_weight(w.detach(), fmt)  # no gradient flows through the packing
    return _pw(data, gamma, w.shape[0], w.shape[1], fmt)


def transpose_packed(pw: PackedWeight) -> PackedWeight:
    """kernels.transpose_packed via the custom op (traceable by torch.compile)."""
    data = torch.ops.bitnet_fast.transpose_packed(pw.data, pw.gamma, pw.out_features, pw.in_features, pw.format)
    return _pw(data, pw.gamma, pw.in_features, pw.out_features, pw.format)


def bitlinear_train(
    x: Tensor, weight: Tensor, pw: PackedWeight, bias: Tensor | None = None, pw_t: PackedWeight | None = None
) -> Tensor:
    """STE BitLinear for training: (..., K) float -> (..., N). `pw` must be the packed form of `weight`; with
    `pw_t`, its packed transpose, the input gradient is the int8 one (see the module docstring)."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    data_t = None if pw_t is None else pw_t.data
    args = (x2, weight, pw.data, pw.gamma, bias, pw.out_features, pw.in_features, pw.format, data_t)
    if torch.compiler.is_compiling():
        y = torch.ops.bitnet_fast.ste_linear(*args)[0]
    else:
        y = BitLinearFunction.apply(*args)[0]
    return y.reshape(*x.shape[:-1], pw.out_features)


def bitlinear_inference(x: Tensor, pw: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """Packed BitLinear forward (no weight gradient): (..., K) float -> (..., N)."""
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return kernels.bitlinear(x, pw, bias)  # eager decode: skip the custom-op dispatch (~0.1 ms per call)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    y = torch.ops.bitnet_fast.bitlinear(x2, pw.data, pw.gamma, bias, pw.out_features, pw.in_features, pw.format)
    return y.reshape(*x.shape[:-1], pw.out_features)
