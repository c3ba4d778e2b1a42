"""BitLinear autograd: the fused kernels as torch custom ops, with a straight-through-estimator backward.

Each kernel is a `torch.library.custom_op` in the `bitnet_fast` namespace with a fake (meta) implementation,
so `torch.compile` traces through BitLinear without graph breaks. Custom ops cannot take a PackedWeight, so a
packed weight travels as (data, gamma, out_features, in_features, fmt). The training op `bitnet_fast::ste_linear`
gets its gradients from `BitLinearFunction` (registered with `register_autograd`), which eager code calls directly
to skip the custom-op dispatch. Both match the DESIGN.md detach form `kernels.reference.ste_linear`:

    forward   y  = (xq @ Wt^T) * gamma / s + b          (exact int32 product, float epilogue)
    backward  dx = dy @ (Wt * gamma)      dW = dy^T @ (xq / s)      db = sum(dy)
"""

# No `from __future__ import annotations`: custom_op reads the real annotations to infer the schemas.

import torch

from bitnet_fast import kernels
from bitnet_fast.kernels import PackedWeight, get_format

__all__ = ["BitLinearFunction", "bitlinear_inference", "bitlinear_train", "pack_weight"]

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
) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: (M, K) float -> (y (M, N) x.dtype, xq, s). `weight` (the latent weight) only carries
    the gradient; the product uses its packed form (data, gamma), which the caller keeps in sync."""
    return _ste_forward(x, weight, data, gamma, bias, out_features, in_features, fmt)


def _ste_forward(x, weight, data, gamma, bias, out_features, in_features, fmt) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.bitlinear_train(x, _pw(data, gamma, out_features, in_features, fmt), bias, x.dtype)


@_ste_linear.register_fake
def _(x, weight, data, gamma, bias, out_features, in_features, fmt):
    m = x.shape[0]
    y = x.new_empty((m, out_features))
    return y, x.new_empty(x.shape, dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- autograd
class BitLinearFunction(torch.autograd.Function):
    """STE linear over the fused kernels: (x (M, K), latent weight (N, K), packed data, gamma, bias, N, K, fmt)
    -> (y (M, N), xq, s). Eager training calls it directly (cheaper than custom-op dispatch); its setup_context
    and backward are also the autograd of `bitnet_fast::ste_linear`, which torch.compile traces."""

    forward = staticmethod(_ste_forward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, data, gamma, bias, out_features, in_features, fmt = inputs
        ctx.save_for_backward(data, gamma, output[1], output[2])  # packed weight, xq, s
        ctx.meta = (out_features, in_features, fmt, x.dtype, weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, grad_y, *_unused):
        data, gamma, xq, s = ctx.saved_tensors
        out_features, in_features, fmt, x_dtype, w_dtype, b_dtype = ctx.meta
        grad_y = grad_y.contiguous()
        traced = torch.compiler.is_compiling()  # AOTAutograd traces this: use the ops (they have fake kernels)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if traced:
                gx = torch.ops.bitnet_fast.grad_input(grad_y, data, gamma, out_features, in_features, fmt)
            else:
                gx = kernels.grad_input(grad_y, _pw(data, gamma, out_features, in_features, fmt))
            gx = gx.to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = (torch.ops.bitnet_fast.grad_weight if traced else kernels.grad_weight)(grad_y, xq, s).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[4]:
            gb = grad_y.float().sum(0).to(b_dtype)
        return gx, gw, None, None, gb, None, None, None


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


def bitlinear_train(x: Tensor, weight: Tensor, pw: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """STE BitLinear for training: (..., K) float -> (..., N). `pw` must be the packed form of `weight`."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    args = (x2, weight, pw.data, pw.gamma, bias, pw.out_features, pw.in_features, pw.format)
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
