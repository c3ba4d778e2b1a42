"""BitLinear, a drop-in ternary replacement for nn.Linear, and `convert` / `pack_model` for whole models.

A BitLinear lives in one of two modes:
    latent  (training)   keeps the full-precision weight; its packed ternary form is cached and re-packed only
                         when the weight changes (keyed on the tensor's version counter and storage pointer)
    packed  (inference)  keeps only the PackedWeight (~2 bits/weight + one fp32 scale); backward raises
"""

from __future__ import annotations

import fnmatch
import math
import mmap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bitnet_fast import kernels
from bitnet_fast.autograd import bitlinear_inference, bitlinear_train, pack_weight, transpose_packed
from bitnet_fast.kernels import PackedWeight

__all__ = ["GRAD_INPUTS", "BitLinear", "convert", "materialize", "meta_parameters", "pack_model", "set_grad_input",
           "unpack_model"]

_STATE_KEYS = ("data", "gamma", "header")  # PackedWeight.state(), stored as {prefix}packed.{key}
_FORMATS: dict[str, str] = {}  # device type -> compute format (BitLinear._format)
# The STE input gradient: "exact" = dY @ (Wt * gamma) in fp32; "int8" = dY quantized per row to int8 times Wt
# exactly (kernels.reference.grad_input_int8): the backward's second int8 GEMM instead of an fp32 one.
GRAD_INPUTS = ("exact", "int8")


def _check_grad_input(mode: str) -> str:
    if mode not in GRAD_INPUTS:
        raise ValueError(f"grad_input={mode!r}; use one of {GRAD_INPUTS}")
    return mode


def _to_compute(pw: PackedWeight, device: torch.device) -> PackedWeight:
    """`pw` on `device`, in the format the kernels there compute with (tq1 storage -> i2 compute, ...)."""
    fmt = kernels.compute_format(device)
    return pw if pw.device == device and pw.format == fmt else kernels.repack(pw, fmt, device)


class BitLinear(nn.Module):
    """y = act_quant(x) @ ternary(W)^T * scales + b, trained with the straight-through estimator.

    Same constructor as nn.Linear, plus `subln`: an RMSNorm on the input before activation quantization
    (the BitNet b1.58 recipe), and `grad_input` (GRAD_INPUTS): how training computes the gradient to the input.
    `.pack()` turns it into an inference-only layer that holds ~2 bits/weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        subln: bool = False,
        grad_input: str = "exact",
    ) -> None:
        super().__init__()
        self.grad_input = _check_grad_input(grad_input)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.norm = nn.RMSNorm(in_features, eps=1e-6, **factory) if subln else None
        self._packed: PackedWeight | None = None  # set in packed mode
        # latent mode: (weight key, packed weight, its packed transpose for grad_input="int8" or None)
        self._cache: tuple[tuple, PackedWeight, PackedWeight | None] | None = None
        self._latent_dtype = self.weight.dtype
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization (kaiming-uniform weight, uniform bias)."""
        if self.weight is None:
            raise RuntimeError("this BitLinear is packed; reset_parameters needs the latent weight (call .unpack())")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, subln: bool = False, pack: bool = False, grad_input: str = "exact"
    ) -> BitLinear:
        """A BitLinear sharing `linear`'s weight and bias Parameters (same device, dtype, requires_grad).

        With `pack=True` it is packed right away; a Linear on the meta device (a model built without memory) is
        then initialised on the CPU the way nn.Linear initialises, packed, and its fp32 weight dropped, so
        converting a whole meta model holds one layer in fp32 at a time."""
        w = linear.weight
        if pack and w.is_meta:
            return _packed_init(linear, subln)
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta", dtype=w.dtype,
                  grad_input=grad_input)
        new.weight, new.bias, new._latent_dtype = w, linear.bias, w.dtype
        if subln:
            new.norm = nn.RMSNorm(linear.in_features, eps=1e-6, device=w.device, dtype=w.dtype)
        return new.pack() if pack else new

    # -------------------------------------------------------------------------------------------- modes
    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    @property
    def packed_weight(self) -> PackedWeight:
        """The ternary weight in the compute format (packed mode: the stored one; latent: the cached one)."""
        if self._packed is not None:
            return self._packed
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable by a later training step
                self._cache = (key, kernels.pack(w.detach(), kernels.compute_format(w.device)), None)
        return self._cache[1]

    def _packed_transpose(self) -> PackedWeight:
        """The cached packed weight's transpose (grad_input="int8"), made once per weight version."""
        pw = self.packed_weight
        if self._cache[2] is None:
            self._cache = (*self._cache[:2], kernels.transpose_packed(pw))
        return self._cache[2]

    def pack(self) -> BitLinear:
        """Switch to inference-only packed mode: keep the PackedWeight, free the latent weight."""
        if self._packed is None:
            self._packed = self.packed_weight
            self._latent_dtype = self.weight.dtype
            self.weight = None
            self._cache = None
        super().train(False)
        return self

    def unpack(self) -> BitLinear:
        """Back to trainable latent mode. The latent weight Wt * gamma / mean(|Wt|) quantizes to the same ternary
        matrix and (up to rounding in the latent dtype) the same scale, so outputs are unchanged."""
        if self._packed is None:
            return self
        wt, gamma = kernels.unpack(self._packed)
        frac = wt.abs().float().mean()  # fraction of non-zero weights; its absmean is gamma * frac
        w = wt.float() * (gamma / frac) if frac > 0 else torch.zeros(wt.shape, device=wt.device)
        self.weight = nn.Parameter(w.to(self._latent_dtype))
        self._packed = None
        return self

    def train(self, mode: bool = True) -> BitLinear:
        if mode and self._packed is not None:
            raise RuntimeError(
                "this BitLinear is packed (inference-only) and cannot be trained; call .unpack() first "
                "(or bitnet_fast.nn.unpack_model(model)) to get a trainable latent weight back"
            )
        return super().train(mode)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if self.norm is not None:
            x = self.norm(x)
        if self._packed is not None:
            return bitlinear_inference(x, self._packed, self.bias)
        int8_grad = self.grad_input == "int8" and torch.is_grad_enabled()
        if torch.compiler.is_compiling():  # traced graphs re-pack each call (the version cache is Python state)
            pw = pack_weight(self.weight, self._format())
            pw_t = transpose_packed(pw) if int8_grad else None
        else:
            pw = self.packed_weight
            pw_t = self._packed_transpose() if int8_grad else None
        if torch.is_grad_enabled():
            return bitlinear_train(x, self.weight, pw, self.bias, pw_t)
        return bitlinear_inference(x, pw, self.bias)

    def extra_repr(self) -> str:
        mode = f"packed[{self._packed.format}]" if self._packed is not None else "latent"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"subln={self.norm is not None}, mode={mode}"
            + (f", grad_input={self.grad_input}" if self.grad_input != "exact" else "")
        )

    # ---------------------------------------------------------------------------- device moves and state
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._cache = None
        if self._packed is not None:
            data = fn(self._packed.data)
            moved = PackedWeight(data, self._packed.gamma.to(data.device), self._packed.shape, self._packed.format)
            self._packed = _to_compute(moved, data.device)
        return self

    def _device(self) -> torch.device:
        return self._packed.device if self._packed is not None else self.weight.device

    def _format(self) -> str:
        """The compute format for this layer's device, remembered per device type: a plain dict lookup that
        torch.compile traces as a constant (no probe kernel, no torch._dynamo import at `import bitnet_fast.nn`)."""
        device_type = self.weight.device.type
        if device_type not in _FORMATS:
            _FORMATS[device_type] = kernels.compute_format(device_type)
        return _FORMATS[device_type]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            for k, t in self._packed.state().items():
                destination[prefix + "packed." + k] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        names = {k: prefix + "packed." + k for k in _STATE_KEYS}
        if any(n in state_dict for n in names.values()):  # a packed checkpoint: this module becomes packed
            where = f"{prefix}packed"
            pw = PackedWeight.from_state({k: state_dict[n] for k, n in names.items() if n in state_dict}, where)
            if pw.shape != (self.out_features, self.in_features):
                raise ValueError(
                    f"{where}: the checkpoint holds a packed weight of shape (out, in)={pw.shape} but this "
                    f"BitLinear is ({self.out_features}, {self.in_features}); it belongs to another model or layer"
                )
            if self._packed is None:
                self._latent_dtype = self.weight.dtype
            device = self._device()
            self._packed = _to_compute(pw, pw.device if device.type == "meta" else device)  # meta: load in place
            self.weight, self._cache = None, None
            super().train(False)
        elif prefix + "weight" in state_dict and self._packed is not None:  # a latent checkpoint: become latent
            self.unpack()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        unexpected[:] = [k for k in unexpected if k not in names.values()]


def _packed_init(linear: nn.Linear, subln: bool) -> BitLinear:
    """A packed BitLinear for a meta-device Linear: its weight initialised on the CPU as nn.Linear does, in an
    anonymous memory map that is unmapped once packed (a heap allocation of this size would stay in the
    process after free, and a model's worth of them would add up)."""
    n, k = linear.out_features, linear.in_features
    dtype = linear.weight.dtype
    with meta_parameters():
        layer = BitLinear(k, n, bias=linear.bias is not None, device="meta", dtype=dtype, subln=subln)
    if layer.bias is not None:  # (not to_empty on the layer: it would allocate, and touch, an fp32 weight too)
        layer.bias = nn.Parameter(torch.empty(n, dtype=dtype))
    if layer.norm is not None:
        layer.norm.to_empty(device="cpu")
    buf = mmap.mmap(-1, n * k * torch.finfo(dtype).bits // 8)
    try:
        layer.weight = nn.Parameter(torch.frombuffer(buf, dtype=dtype).view(n, k))
        layer.reset_parameters()
        if layer.norm is not None:
            layer.norm.reset_parameters()
        layer.pack()
    finally:
        buf.close()  # pack() dropped every reference to the weight
    return layer


# -------------------------------------------------------------------------------------------- whole models
def _skipped(name: str, skip: Iterable[str]) -> bool:
    """True when the qualified module `name` (or its last component) matches a pattern in `skip`."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in skip)


def _convertible(child: nn.Module, parent: nn.Module | None = None) -> bool:
    """An nn.Linear (or subclass) that is called through its own forward: MultiheadAttention reads out_proj's
    weight directly and a subclass with its own forward (LoRA, ...) is not a plain linear map."""
    return (
        isinstance(child, nn.Linear)
        and type(child).forward is nn.Linear.forward
        and not isinstance(parent, nn.MultiheadAttention)
    )


def convert(
    model: nn.Module,
    *,
    skip: Iterable[str] = ("lm_head",),
    pack: bool = False,
    subln: bool = False,
    grad_input: str = "exact",
) -> nn.Module:
    """Swap every nn.Linear in `model` for a BitLinear, in place, and return the model.

    The BitLinear shares the Linear's weight/bias Parameters (device, dtype and optimizer state carry over).
    `skip` holds fnmatch patterns matched against qualified names and their last component ("lm_head",
    "model.layers.0.*"). `pack=True` packs each layer as it is converted (inference); on a model built on the
    meta device (`with torch.device("meta"): ...`) each layer is then initialised on the CPU and packed one at a
    time, never holding the fp32 model. `subln=True` adds an RMSNorm to each layer; `grad_input` is each
    layer's input-gradient mode for training (GRAD_INPUTS).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        raise TypeError(f"skip must be a collection of name patterns, not a single string; use skip=({skip!r},)")
    skip = tuple(skip)
    _check_grad_input(grad_input)
    if _convertible(model):
        return BitLinear.from_linear(model, subln=subln, pack=pack, grad_input=grad_input)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if _convertible(child, parent) and not _skipped(full, skip):
                setattr(parent, name, BitLinear.from_linear(child, subln=subln, pack=pack, grad_input=grad_input))
    return pack_model(model) if pack else model


def pack_model(model: nn.Module) -> nn.Module:
    """Pack every BitLinear in `model` for inference (frees the latent weights); returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.pack()
    return model


def set_grad_input(model: nn.Module, mode: str) -> nn.Module:
    """Set every BitLinear's input-gradient mode (GRAD_INPUTS) for training; returns the model."""
    _check_grad_input(mode)
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.grad_input = mode
    return model


def unpack_model(model: nn.Module) -> nn.Module:
    """Make every packed BitLinear in `model` trainable again (see BitLinear.unpack); returns the model."""
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.unpack()
    return model


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "eye_", "dirac_", "sparse_")


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory) and their buffers as usual (RoPE
    tables and the like are computed, not stored): for models whose weights are loaded from a file or packed
    layer by layer (`convert(model, pack=True)`, `export.load_packed`). torch.nn.init calls on meta tensors are
    skipped: there is nothing to initialise, and some (normal_) would load torch's Python meta kernels, ~145 MiB."""
    register = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in _INITS}

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    def skip_meta(init):
        return lambda tensor, *args, **kw: tensor if tensor.is_meta else init(tensor, *args, **kw)

    nn.Module.register_parameter = register_on_meta
    for name, init in inits.items():
        setattr(nn.init, name, skip_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, init in inits.items():
            setattr(nn.init, name, init)


def materialize(model: nn.Module, init: Callable[[nn.Module], None]) -> nn.Module:
    """Allocate on the CPU, module by module, every parameter still on the meta device and initialise it with
    `init(module)` (e.g. a Hugging Face model's `_init_weights`); packed layers are left as they are."""
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            init(module)
    return model
