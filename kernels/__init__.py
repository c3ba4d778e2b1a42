"""bitnet_fast.kernels: the public kernel API and backend dispatch. Arrays in, arrays out; no nn.Module.

Every function picks a backend from the device of its tensors: CPU -> "numba", CUDA -> "triton", anything
else -> "reference" (pure torch, `reference.py`). The environment variable BITNET_FAST_BACKEND
(numba | triton | reference) overrides the choice. Backends compile lazily: importing this package compiles
nothing.

Shapes: x (M, K) float, xq (M, K) int8, s (M,) fp32, PackedWeight of logical shape (N, K), y (M, N).
`bitlinear` and `quantize_activations` also accept (..., K) and keep the leading dims.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType, SimpleNamespace

import torch

from . import reference
from .packing import FORMATS, LAYOUT_VERSION, PackedWeight, get_format, register_format

__all__ = [
    "FORMATS",
    "LAYOUT_VERSION",
    "PackedWeight",
    "backend_for",
    "bitlinear",
    "bitlinear_train",
    "compute_format",
    "get_format",
    "grad_input",
    "grad_weight",
    "matmul",
    "matmul_int",
    "pack",
    "pack_ternary",
    "quantize_activations",
    "quantize_weight",
    "reference",
    "register_format",
    "repack",
    "transpose_packed",
    "unpack",
]

BACKENDS = ("numba", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_F32 = torch.float32  # dtypes are singletons: `x.dtype is _F32` is the cheapest test


# --------------------------------------------------------------------------------------------- reference backend
def _ref_unpack(pw: PackedWeight) -> torch.Tensor:
    return get_format(pw.format).unpack(pw.data, pw.in_features)


def _ref_pack(wt: torch.Tensor, gamma: torch.Tensor, fmt: str) -> PackedWeight:
    return PackedWeight(get_format(fmt).pack(wt.cpu()).to(wt.device), gamma.float().reshape(()), tuple(wt.shape), fmt)


_reference_backend = SimpleNamespace(
    name="reference",
    default_format="i2",
    bitlinear_takes_nd=False,
    quantize_weight=reference.weight_quant,
    quantize_activations=reference.act_quant,
    pack=_ref_pack,
    unpack=_ref_unpack,
    matmul_int=lambda xq, pw: reference.matmul_int(xq, _ref_unpack(pw)),
    matmul=lambda xq, s, pw, bias, out_dtype: reference.matmul(xq, s, _ref_unpack(pw), pw.gamma, bias, out_dtype),
    bitlinear=lambda x, pw, bias, out_dtype: reference.matmul(
        *reference.act_quant(x), _ref_unpack(pw), pw.gamma, bias, out_dtype
    ),
    grad_input=lambda gy, pw: reference.grad_input(gy, _ref_unpack(pw), pw.gamma),
    grad_weight=reference.grad_weight,
)

_loaded: dict[str, ModuleType | SimpleNamespace] = {"reference": _reference_backend}
_warned: set[str] = set()
_resolved: dict[tuple[str, str], str] = {}  # (device type, BITNET_FAST_BACKEND) -> backend name


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _load(name: str) -> ModuleType | SimpleNamespace:
    """Import a backend module on first use (cpu.py for numba, gpu.py for triton)."""
    if name not in _loaded:
        module = {"numba": ".cpu", "triton": ".gpu"}[name]
        _loaded[name] = importlib.import_module(module, __name__)
    return _loaded[name]


def _cpu_pack() -> ModuleType:
    """The Numba packer (loaded with the numba backend)."""
    return importlib.import_module(".cpu_pack", __name__)


def backend_for(device: torch.device | str) -> str:
    """The backend name that serves tensors on `device` (honouring BITNET_FAST_BACKEND)."""
    device_type = torch.device(device).type
    forced = _forced_backend()
    key = (device_type, forced)
    if key not in _resolved:
        _resolved[key] = _resolve(device_type, forced.strip().lower())
    return _resolved[key]


def _resolve(device_type: str, forced: str) -> str:
    """backend_for without the cache: validate the override, import the backend or fall back with a warning."""
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BITNET_FAST_BACKEND={forced!r} is not a backend; use one of {BACKENDS}")
        want = {"numba": "cpu", "triton": "cuda"}.get(forced)
        if want and device_type != want:
            raise ValueError(
                f"BITNET_FAST_BACKEND={forced} serves {want} tensors but got a {device_type} tensor; "
                f"move the tensors with .to('{want}') or unset BITNET_FAST_BACKEND"
            )
        name = forced
    else:
        name = {"cpu": "numba", "cuda": "triton"}.get(device_type, "reference")
    if name == "reference":
        return name
    try:
        _load(name)
    except ImportError as e:
        _warn_once(name, f"bitnet_fast: the {name} backend is unavailable ({e}); using the slow reference kernels")
        return "reference"
    return name


# os.environ.get costs ~2 us (it encodes the key each time); on CPython the encoded environment is a plain dict.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("BITNET_FAST_BACKEND") if hasattr(os.environ, "encodekey") else None


def _forced_backend() -> str:
    """$BITNET_FAST_BACKEND as it is now (read on every call, so changing it at runtime takes effect)."""
    if _ENV_DATA is None or _ENV_KEY is None:
        return os.environ.get("BITNET_FAST_BACKEND", "")
    raw = _ENV_DATA.get(_ENV_KEY)
    return "" if raw is None else os.environ.decodevalue(raw)


# bitlinear's hot path tests `_ENV_KEY not in _UNFORCED` inline (a function call costs ~1 us there, on an interpreter
# the previous layer's weights have evicted from L2): BITNET_FAST_BACKEND unset. Where the environment is not a
# plain dict, a stand-in holding the key sends every call down the general path, which reads it properly.
_UNFORCED = _ENV_DATA if _ENV_DATA is not None and _ENV_KEY is not None else {_ENV_KEY: None}


def compute_format(device: torch.device | str) -> str:
    """The packed format the backend serving `device` computes with ("i2" on CPU, "i2g" with Triton)."""
    return _backend(torch.device(device).type).default_format


def _device_type(t: torch.Tensor) -> str:
    """t.device.type without building a torch.device on the hot CPU path (t.is_cpu: 0.2 us, t.device.type: 1 us)."""
    return "cpu" if t.is_cpu else t.device.type


def _backend(device_type: str):
    """The backend module for tensors of `device_type`: two dict lookups on the hot path (resolution is cached)."""
    name = _resolved.get((device_type, _forced_backend())) or backend_for(device_type)
    return _loaded[name]


# ---------------------------------------------------------------------------------------------- argument checks
def _check_tensor(name: str, t, dtypes=None, ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {list(dtypes)} (convert with .to(...))")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_packed(pw, x: torch.Tensor, k: int, arg: str = "x") -> str:
    """Check pw against x, whose last dim is k; return the device type they share."""
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"weight must be a PackedWeight (from kernels.pack), got {type(pw).__name__}")
    if pw.shape[1] != k:
        raise ValueError(f"{arg} has K={k} columns but the packed weight has in_features={pw.in_features}")
    device_type = _device_type(x)
    if _device_type(pw.data) != device_type:
        raise ValueError(f"{arg} is on {x.device} but the packed weight is on {pw.device}; move one with .to(...)")
    return device_type


def _check_bias(bias, n: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    _check_tensor("bias", bias, FLOAT_DTYPES, 1)
    if bias.shape[0] != n:
        raise ValueError(f"bias has {bias.shape[0]} elements; expected out_features={n}")
    if _device_type(bias) != _device_type(x):
        raise ValueError(f"bias is on {bias.device} but the inputs are on {x.device}")


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype} is not supported; use one of {list(OUT_DTYPES)}")


def _check_out(out, shape: tuple, dtype: torch.dtype, x: torch.Tensor) -> None:
    """`out=` must be the result's shape and dtype, on x's device, and outside autograd (it is written in place)."""
    _check_tensor("out", out)
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; the result is {shape} (x's leading dims, out_features)")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}; the result is {dtype} (pass out_dtype={out.dtype} or an out of "
                        f"{dtype})")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}")
    if out.requires_grad:
        raise RuntimeError("out requires grad: kernels.bitlinear writes it in place, outside autograd (use BitLinear, "
                           "or an out that does not require grad)")


# --------------------------------------------------------------------------------------------------- public API
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (Wt int8 ternary (N, K), gamma fp32 0-d): absmean quantization."""
    _check_tensor("w", w, FLOAT_DTYPES, 2)
    return _backend(_device_type(w)).quantize_weight(w)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) float -> (xq int8 (..., K), s fp32 (...)): per-row absmax; non-finite rows get s = NaN."""
    _check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (..., K), got a scalar")
    xq, s = _backend(_device_type(x)).quantize_activations(x.reshape(-1, x.shape[-1]))
    return xq.reshape(x.shape), s.reshape(x.shape[:-1])


def pack_ternary(wt: torch.Tensor, gamma: torch.Tensor | float, fmt: str | None = None) -> PackedWeight:
    """Pack an already-ternary (N, K) int8 matrix with its scale into `fmt` (default: the backend's)."""
    _check_tensor("wt", wt, (torch.int8,), 2)
    gamma = torch.as_tensor(gamma, dtype=torch.float32, device=wt.device).reshape(())
    backend = _backend(_device_type(wt))
    fmt = fmt or backend.default_format
    get_format(fmt)
    return backend.pack(wt, gamma, fmt)


_CPU_FORMATS = ("i2", "tq1")  # formats the Numba packer fuses and transcodes without an int8 matrix


def pack(w: torch.Tensor, fmt: str | None = None) -> PackedWeight:
    """Quantize a float (N, K) weight (absmean) and pack it: the one call that prepares a layer."""
    _check_tensor("w", w, FLOAT_DTYPES, 2)
    if backend_for(w.device) == "numba" and (fmt or "i2") in _CPU_FORMATS:
        return _cpu_pack().quantize_and_pack(w, fmt or "i2")  # fused: never builds the int8 matrix
    wt, gamma = quantize_weight(w)
    return pack_ternary(wt, gamma, fmt)


def unpack(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """PackedWeight -> (Wt int8 (N, K), gamma fp32 0-d)."""
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"pw must be a PackedWeight, got {type(pw).__name__}")
    return _backend(_device_type(pw.data)).unpack(pw), pw.gamma


def repack(pw: PackedWeight, fmt: str, device: torch.device | str | None = None) -> PackedWeight:
    """Convert a packed weight to another format (and device): e.g. tq1 storage -> i2 compute at load."""
    device = torch.device(device) if device is not None else pw.device
    if (
        pw.device.type == device.type == "cpu"
        and {pw.format, fmt} <= set(_CPU_FORMATS)
        and backend_for(device) == "numba"
    ):
        return _cpu_pack().transcode(pw, fmt)  # i2 <-> tq1 directly, ~2x faster than unpack + pack
    wt, gamma = unpack(pw)
    return pack_ternary(wt.to(device), gamma.to(device), fmt)


def transpose_packed(pw: PackedWeight) -> PackedWeight:
    """The packed (K, N) transpose of a packed (N, K) weight, same gamma and format: bitlinear(dY, it) is the
    STE's input gradient dY @ Wt with dY quantized to int8 (BitLinear's `grad_input="int8"`)."""
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"pw must be a PackedWeight, got {type(pw).__name__}")
    if pw.device.type == "cpu" and pw.format == "i2" and backend_for(pw.device) == "numba":
        return _cpu_pack().transpose(pw)  # one pass over the packed bytes
    wt, gamma = unpack(pw)
    return pack_ternary(wt.t().contiguous(), gamma, pw.format)


def matmul_int(xq: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """(M, K) int8 x packed (N, K) -> (M, N) int32, exact."""
    _check_tensor("xq", xq, (torch.int8,), 2)
    return _backend(_check_packed(pw, xq, xq.shape[1], "xq")).matmul_int(xq, pw)


def matmul(
    xq: torch.Tensor,
    s: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(M, K) int8, (M,) scales x packed (N, K) -> (M, N): exact int32 product, epilogue acc * gamma / s + bias."""
    _check_tensor("xq", xq, (torch.int8,), 2)
    _check_tensor("s", s, (torch.float32,), 1)
    if s.shape[0] != xq.shape[0]:
        raise ValueError(f"s has {s.shape[0]} scales but xq has M={xq.shape[0]} rows")
    device_type = _check_packed(pw, xq, xq.shape[1], "xq")
    _check_bias(bias, pw.out_features, xq)
    _check_out_dtype(out_dtype)
    return _backend(device_type).matmul(xq, s, pw, bias, out_dtype)


def bitlinear(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused BitLinear forward: quantize (..., K) float activations and multiply by the packed weight.
    `out`: a tensor of the result's shape (..., N) and dtype (out_dtype, else x's) to write into and return, as
    torch's out= arguments: a decode loop reusing one buffer per layer skips an allocation per call (~5 us at M=1
    here, on an interpreter the previous layer's weights have evicted from L2).
    (Decode calls it per layer per token: a CPU x against a weight the numba backend has already served is
    recognised from a few attribute reads and skips the checks below -- fp32 contiguous x with no out_dtype goes
    straight to cpu.bitlinear_fp32, other float x or out dtypes through cpu.bitlinear_cast, which converts as the
    general path does; both hand back None for what the checks must judge.)"""
    view = pw.views.get("numba") if type(pw) is PackedWeight else None  # filled by the numba backend: CPU i2
    if view is not None and type(x) is torch.Tensor and x.is_cpu and _ENV_KEY not in _UNFORCED:
        if out_dtype is None and x.dtype is _F32 and x.is_contiguous():
            y = _loaded["numba"].bitlinear_fp32(x, pw, view, bias, 0, None, out)
        elif x.dtype in FLOAT_DTYPES and (out_dtype is None or out_dtype in OUT_DTYPES):
            y = _loaded["numba"].bitlinear_cast(x, pw, view, bias, out_dtype or x.dtype, out)
        else:
            y = None
        if y is not None:  # None: x's shape, the bias or out does not fit, and the checks below say how (or convert)
            return y
    _check_tensor("x", x, FLOAT_DTYPES)
    shape = x.shape
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("x must have at least 1 dim (..., K), got a scalar")
    device_type = _check_packed(pw, x, shape[-1])
    if bias is not None:
        _check_bias(bias, pw.shape[0], x)
    if out_dtype is None:
        out_dtype = x.dtype
    else:
        _check_out_dtype(out_dtype)
    if out is not None:
        _check_out(out, (*shape[:-1], pw.out_features), out_dtype, x)
    backend = _backend(device_type)
    if ndim == 2 or backend.bitlinear_takes_nd:  # no torch reshapes on the decode path
        y = backend.bitlinear(x, pw, bias, out_dtype)
    else:
        y = backend.bitlinear(x.reshape(-1, shape[-1]), pw, bias, out_dtype).reshape(*shape[:-1], pw.out_features)
    return y if out is None else out.copy_(y)


def bitlinear_train(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training forward: bitlinear's y (M, N) plus the quantized activations (xq (M, K) int8, s (M,)) that
    grad_weight needs, from one quantization pass. x is 2-D (M, K)."""
    _check_tensor("x", x, FLOAT_DTYPES, 2)
    device_type = _check_packed(pw, x, x.shape[1])
    _check_bias(bias, pw.shape[0], x)
    out_dtype = out_dtype or x.dtype
    _check_out_dtype(out_dtype)
    backend = _backend(device_type)
    if hasattr(backend, "bitlinear_train"):
        return backend.bitlinear_train(x, pw, bias, out_dtype)
    xq, s = backend.quantize_activations(x)
    return backend.matmul(xq, s, pw, bias, out_dtype), xq, s


def grad_input(grad_y: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """STE backward to the input: (M, N) float x dequantized ternary (N, K) -> (M, K) fp32."""
    _check_tensor("grad_y", grad_y, FLOAT_DTYPES, 2)
    if grad_y.shape[1] != pw.out_features:
        raise ValueError(f"grad_y has N={grad_y.shape[1]} columns; the weight has out_features={pw.out_features}")
    return _backend(_device_type(grad_y)).grad_input(grad_y, pw)


def grad_weight(grad_y: torch.Tensor, xq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """STE backward to the latent weight: grad_y^T (N, M) x dequantized activations (M, K) -> (N, K) fp32."""
    _check_tensor("grad_y", grad_y, FLOAT_DTYPES, 2)
    _check_tensor("xq", xq, (torch.int8,), 2)
    _check_tensor("s", s, (torch.float32,), 1)
    if grad_y.shape[0] != xq.shape[0] or s.shape[0] != xq.shape[0]:
        raise ValueError(f"grad_y ({grad_y.shape[0]}), xq ({xq.shape[0]}) and s ({s.shape[0]}) must share M")
    return _backend(_device_type(grad_y)).grad_weight(grad_y, xq, s)
