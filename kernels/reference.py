"""Pure-torch oracle for every bitnet-fast kernel: slow, obviously correct, and the definition of the formats.

Every fast kernel (Numba on CPU, Triton on GPU) must agree with this file: integer results bit-exactly,
float results to float tolerance. The math is BitNet b1.58 (see DESIGN.md):

    weights      gamma = max(mean(|W|), 1e-5)        Wt = clip(round(W / gamma), -1, 1)      (per tensor)
    activations  s = 127 / max(max(|x|), 1e-5)       xq = clip(round(x * s), -128, 127)      (per row)
    forward      y = (xq @ Wt^T) * gamma / s  (+ bias)      the product is exact in int32

Rounding is round-half-to-even (torch.round / np.rint); all float math before rounding is fp32.

Non-finite policy: a row of x that holds NaN or +-Inf gets xq = 0 and s = NaN, so its output row is NaN
and never comes out finite. A non-finite weight makes gamma non-finite, so every output is non-finite too.
"""

from __future__ import annotations

import torch

EPS = 1e-5
I2_BLOCK = 128  # K is padded to a multiple of this in the i2 format
TQ1_TRITS = 5  # trits per byte in the tq1 format (3**5 = 243 < 256)


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (Wt int8 in {-1,0,1} (N, K), gamma fp32 0-d). gamma's mean accumulates in fp64."""
    w = w.float()
    gamma = w.abs().double().mean().float().clamp(min=EPS)
    wt = torch.round(w / gamma).clamp(-1, 1).to(torch.int8)
    return wt, gamma


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (xq int8 (M, K), s fp32 (M,)), per-row absmax; non-finite rows get xq=0, s=NaN."""
    x = x.float()
    finite = torch.isfinite(x).all(dim=-1)
    amax = x.abs().amax(dim=-1).clamp(min=EPS)
    s = 127.0 / amax
    xq = torch.round(x * s[:, None]).clamp(-128, 127)
    xq = torch.where(finite[:, None], xq, torch.zeros_like(xq)).to(torch.int8)
    s = torch.where(finite, s, torch.full_like(s, float("nan")))
    return xq, s


def padded_k(k: int, block: int = I2_BLOCK) -> int:
    """K rounded up to the packing block."""
    return -(-k // block) * block


def pack_i2(wt: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 ternary -> (N, Kp // 4) uint8 in the i2 compute format.

    Code c = w + 1 in {0, 1, 2}. K is padded to Kp (multiple of 128) with code 1 (weight 0). Within each
    block of 128 weights, byte j (0..31) holds weights j, j+32, j+64, j+96 in bits 0-1, 2-3, 4-5, 6-7, so
    `(byte >> 2*q) & 3` over 32 consecutive bytes gives 32 consecutive weights.
    """
    n, k = wt.shape
    kp = padded_k(k)
    c = torch.ones((n, kp), dtype=torch.int32)
    c[:, :k] = wt.to(torch.int32) + 1
    c = c.view(n, kp // I2_BLOCK, 4, 32)  # (N, blocks, quarter q, byte j)
    packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).to(torch.uint8)


def unpack_i2(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, Kp // 4) uint8 i2 -> (N, K) int8 ternary."""
    n, kp4 = packed.shape
    p = packed.to(torch.int32).view(n, kp4 // 32, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)
    c = (p >> shifts) & 3  # (N, blocks, 4, 32)
    return (c.reshape(n, kp4 * 4)[:, :k] - 1).to(torch.int8)


def pack_tq1(wt: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 ternary -> (N, ceil(K / 5)) uint8: byte = sum_i c[5t + i] * 3**i, padded with c = 1."""
    n, k = wt.shape
    kt = -(-k // TQ1_TRITS) * TQ1_TRITS
    c = torch.ones((n, kt), dtype=torch.int32)
    c[:, :k] = wt.to(torch.int32) + 1
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    return (c.view(n, kt // TQ1_TRITS, TQ1_TRITS) * pow3).sum(-1).to(torch.uint8)


def unpack_tq1(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K / 5)) uint8 tq1 -> (N, K) int8 ternary."""
    n, nb = packed.shape
    p = packed.to(torch.int32).view(n, nb, 1)
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    c = (p // pow3) % 3
    return (c.reshape(n, nb * TQ1_TRITS)[:, :k] - 1).to(torch.int8)


def matmul_int(xq: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 ternary -> (M, N) int32, exact.

    Computed in float64: every product and partial sum is an integer of magnitude <= 128 K < 2**53, so the result
    is exact in any summation order, and, unlike an int32 matmul, it exists on CUDA (where the reference serves
    CUDA tensors when triton is missing)."""
    return (xq.double() @ wt.double().T).to(torch.int32)


def epilogue(
    acc: torch.Tensor,
    s: torch.Tensor,
    gamma: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(M, N) int32 -> float: acc * gamma / s[:, None] (+ bias), computed in fp32, then cast to out_dtype."""
    y = acc.float() * (gamma.float() / s.float())[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def matmul(xq, s, wt, gamma, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """Quantized activations x ternary weights with the float epilogue: (M, K), (M,), (N, K), () -> (M, N)."""
    return epilogue(matmul_int(xq, wt), s, gamma, bias, out_dtype)


def bitlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out_dtype=None) -> torch.Tensor:
    """Fused forward from float inputs: (..., K) float, (N, K) latent float weight -> (..., N)."""
    wt, gamma = weight_quant(w)
    xq, s = act_quant(x.reshape(-1, x.shape[-1]))
    y = matmul(xq, s, wt, gamma, bias, out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def grad_input(grad_y: torch.Tensor, wt: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """STE backward to the input: (M, N) float x dequantized (N, K) ternary -> (M, K) fp32."""
    return grad_y.float() @ (wt.float() * gamma)


def grad_input_int8(grad_y: torch.Tensor, wt: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The int8 STE input gradient (BitLinear `grad_input="int8"`, SwitchBack-style): grad_y rows quantized like
    activations (absmax int8), times the ternary weight exactly in int32, then acc * gamma / s: (M, N) -> (M, K)."""
    gq, s = act_quant(grad_y.float())
    return matmul(gq, s, wt.t(), gamma)


def grad_weight(grad_y: torch.Tensor, xq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """STE backward to the latent weight: (M, N)^T x dequantized activations (M, K) -> (N, K) fp32."""
    return grad_y.float().T @ (xq.float() / s[:, None])


def ste_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The training reference (DESIGN.md detach form): values and gradients every autograd path must match."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    xq, s = act_quant(x2.detach())
    wt, gamma = weight_quant(w.detach())
    x_dq = x2 + (xq.float() / s[:, None] - x2).detach()
    w_dq = w.float() + (wt.float() * gamma - w.float()).detach()
    y = torch.nn.functional.linear(x_dq, w_dq, None if bias is None else bias.float())
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


# ------------------------------------------------------------------------ i2g: the Triton (GPU) compute format
I2G_CODES = 16  # 2-bit codes per int32 word in the i2g format (K is padded to I2_BLOCK, like i2)


def pack_i2g(wt: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 ternary -> (N, Kp // 16) int32 in the i2g GPU format.

    Code c = w + 1 in {0, 1, 2}; K is padded to Kp (multiple of 128) with code 1 (weight 0). Word t of a row
    holds weights 16t .. 16t+15 in natural order, weight 16t + j in bits 2j..2j+1 (two's complement int32),
    so `(word >> 2*j) & 3` for j = 0..15 rebuilds a contiguous K slice in registers.
    """
    n, k = wt.shape
    kp = padded_k(k)
    c = torch.ones((n, kp), dtype=torch.int64, device=wt.device)
    c[:, :k] = wt.to(torch.int64) + 1
    shifts = 2 * torch.arange(I2G_CODES, dtype=torch.int64, device=wt.device)
    words = (c.view(n, kp // I2G_CODES, I2G_CODES) << shifts).sum(-1)  # in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_i2g(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, Kp // 16) int32 i2g -> (N, K) int8 ternary."""
    n, kw = packed.shape
    shifts = 2 * torch.arange(I2G_CODES, dtype=torch.int32, device=packed.device)
    c = (packed.to(torch.int32)[:, :, None] >> shifts) & 3  # (N, Kw, 16)
    return (c.reshape(n, kw * I2G_CODES)[:, :k] - 1).to(torch.int8)


# --------------------------------------------------------------------- int8 output head (inference runtime)
def int8_quant_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K) in [-127, 127], fp32 scale (N,)): per-row absmax, w ~= w_q * scale."""
    scale = w.float().abs().amax(dim=1).clamp(min=EPS) / 127.0
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(K,) float x int8 (N, K) with row scales -> (N,) fp32: x quantized to [-127, 127] by its absmax, exact int32
    dot products, epilogue acc * (w_scale / s). A non-finite x gives NaN logits."""
    x = x.float()
    if not torch.isfinite(x).all():
        return torch.full((w_q.shape[0],), float("nan"))
    s = 127.0 / x.abs().amax().clamp(min=EPS)
    xq = torch.round(x * s).to(torch.int32)
    return (w_q.to(torch.int32) @ xq).float() * (w_scale / s)
