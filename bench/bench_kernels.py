"""Kernel speed: the fused BitLinear forward (per-row int8 quant + int8 x ternary matmul + epilogue) per backend.

Peers run as parameters beside the backends so one graph shows the ratios: torch fp32 `F.linear`, fbgemm int8
(`torch.ao` dynamic-quantized Linear, the fastest stock int8 path on CPU) and, on a GPU, torch bf16 next to
Triton. Every impl maps the same seeded float (M, K) activations through a layer of logical shape (N, K).
"""

from __future__ import annotations

import os

from .common import KERNEL_SHAPES, PREFILL_ROWS, SEED, cuda_or_skip, need, pin_threads, randn, sync

IMPLS = ["numba", "reference", "torch_fp32", "fbgemm_int8", "triton", "torch_bf16_cuda"]
CUDA_IMPLS = ("triton", "torch_bf16_cuda")


def _bitnet(impl: str, x, w):
    """The packed-weight forward on the `impl` backend; skip when that backend is absent at this commit."""
    K = need("bitnet_fast.kernels", "pack", "bitlinear", "backend_for")
    if impl == "numba":
        need("bitnet_fast.kernels.cpu")
    if impl == "triton":
        need("bitnet_fast.kernels.gpu")
    if impl == "reference":
        os.environ["BITNET_FAST_BACKEND"] = impl
    else:  # numba on CPU, triton on CUDA: the defaults, timed on the path users get (a forced backend, even the
        os.environ.pop("BITNET_FAST_BACKEND", None)  # default one, sends every call down the checked general path)
    if K.backend_for(x.device) != impl:  # dispatch fell back to the reference kernels
        raise NotImplementedError(f"the {impl} backend cannot be loaded at this commit")
    try:
        pw = K.pack(w)
    except AttributeError as e:  # backend module exists but is incomplete at this commit
        raise NotImplementedError(f"{impl} backend incomplete: {e}") from None
    return lambda: K.bitlinear(x, pw)


def _fbgemm(x, w):
    import torch

    qd = need("torch.ao.quantization", "quantize_dynamic")
    torch.backends.quantized.engine = "fbgemm"
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    qlin = qd.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    return lambda: qlin(x)


def _torch_linear(x, w):
    import torch.nn.functional as F

    return lambda: F.linear(x, w)


class _BitLinearForward:
    """Shared setup; subclasses fix M (rows of activations)."""

    params = (IMPLS, list(KERNEL_SHAPES))
    param_names = ("impl", "shape")
    rows = 1
    timeout = 300

    def setup(self, impl: str, shape: str) -> None:
        import torch

        pin_threads()
        n, k = KERNEL_SHAPES[shape]
        device = "cuda" if impl in CUDA_IMPLS else "cpu"
        if device == "cuda":
            cuda_or_skip()
        x = randn(self.rows, k, seed=SEED, device=device)  # (M, K)
        w = randn(n, k, seed=SEED + 1, device=device)  # (N, K)
        self._backend_env = os.environ.get("BITNET_FAST_BACKEND")
        if impl in ("numba", "reference", "triton"):
            fn = _bitnet(impl, x, w)
        elif impl == "fbgemm_int8":
            fn = _fbgemm(x, w)
        else:
            dtype = torch.bfloat16 if impl == "torch_bf16_cuda" else torch.float32
            fn = _torch_linear(x.to(dtype), w.to(dtype))
        self.fn = torch.inference_mode()(fn)
        self.fn()  # compile / warm caches outside the timed region
        sync()

    def teardown(self, impl: str, shape: str) -> None:
        if getattr(self, "_backend_env", None) is None:
            os.environ.pop("BITNET_FAST_BACKEND", None)
        else:
            os.environ["BITNET_FAST_BACKEND"] = self._backend_env

    def time_bitlinear(self, impl: str, shape: str) -> None:
        self.fn()
        sync()


class GEMV(_BitLinearForward):
    """M = 1: one decode token; bound by reading the weight (2 bits/weight packed vs 32 or 8 for the peers)."""

    rows = 1


class GEMM256(_BitLinearForward):
    """M = 256: the large-M (GEMM) engine that the CPU plan picks on each host class, bound by arithmetic.

    M is above the plan's `gemv_max_m` (128), so AVX-512 VNNI hosts time `int_mm` (oneDNN) and every other
    class the packed engine's MR x NR GEMM tile (kernels/tuning.py). It replaces `GEMM` (M = 128), which the
    VNNI plan keeps on the packed engine, so that name never timed the GEMM engine there.
    """

    rows = 2 * PREFILL_ROWS
    repeat = (1, 5, 20.0)  # the reference backend takes seconds per call here

    def setup(self, impl: str, shape: str) -> None:
        if impl == "numba":  # fail loudly if a plan change moves M = 256 off the GEMM engine this class is named for
            cpu = need("bitnet_fast.kernels.cpu", "params")
            p = cpu.params()
            if p.get("gemm_impl") == "int_mm" and self.rows <= p.get("gemv_max_m", 0):
                raise RuntimeError(f"M={self.rows} stays on the packed GEMV/GEMM engine under {p}")
            if self.rows < p.get("gemm_min_m", 1):
                raise RuntimeError(f"M={self.rows} is below gemm_min_m: the packed engine's decode tile under {p}")
        super().setup(impl, shape)
