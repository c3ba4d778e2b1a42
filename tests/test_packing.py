"""Numba weight quantization and i2/tq1 packing: bit-exact against kernels.reference, plus PackedWeight checks."""

from __future__ import annotations

import bitnet_fast.kernels as K
import numba
import numpy as np
import pytest
import torch
from bitnet_fast.kernels import cpu_pack, reference
from bitnet_fast.kernels.packing import LAYOUT_VERSION, PackedWeight
from hypothesis import given
from hypothesis import strategies as st

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
REF_PACK = {"i2": reference.pack_i2, "tq1": reference.pack_tq1}
REF_UNPACK = {"i2": reference.unpack_i2, "tq1": reference.unpack_tq1}


def _values(rng: np.random.Generator, n: int, k: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weights of one flavour: gaussian at a random scale, a few discrete levels (exact ties at
    w / gamma = +-0.5), sparse, or near the dtype's extremes."""
    if kind == "gauss":
        w = rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-6, 3)
    elif kind == "levels":
        w = rng.choice([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], size=(n, k)) * 2.0 ** rng.integers(-8, 8)
    elif kind == "sparse":
        w = rng.standard_normal((n, k)) * (rng.random((n, k)) < 0.05)
    else:  # extreme: huge and tiny magnitudes mixed, within the dtype's range
        big = float(torch.finfo(dtype).max) / 4
        w = rng.choice([-big, big, 1e-3, -1e-3, 0.0], size=(n, k))
    return torch.from_numpy(w).to(dtype)


def _layout(w: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: transposed storage, a column slice, or broadcast rows."""
    n, k = w.shape
    if how == "transposed":
        return w.T.contiguous().T
    if how == "sliced":
        big = torch.zeros(n, k + 3, dtype=w.dtype)
        big[:, 1 : k + 1] = w
        return big[:, 1 : k + 1]
    if how == "broadcast":
        return w[:1].expand(n, k)
    return w


weights = st.builds(
    lambda seed, n, k, kind, dtype, how: _layout(_values(np.random.default_rng(seed), n, k, kind, dtype), how),
    st.integers(0, 2**32 - 1),
    st.integers(1, 40),
    st.one_of(st.integers(1, 300), st.sampled_from([1, 5, 127, 128, 129, 640])),
    st.sampled_from(["gauss", "levels", "sparse", "extreme"]),
    st.sampled_from(FLOATS),
    st.sampled_from(["contiguous", "transposed", "sliced", "broadcast"]),
)


def _ternary(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(-1, 2, (n, k), dtype=np.int8))


# ----------------------------------------------------------------------- the formats' definitions, by hand
# kernels/reference.py defines the layouts and every packer is compared with it, so the reference itself is
# checked here against bytes worked out by hand from the layout docs (docs/packing.md, docs/gpu.md) and against
# unpackers written with Python integers, sharing no code with it.
def _codes(wt: torch.Tensor) -> list[list[int]]:
    return [[int(w) + 1 for w in row] for row in wt.tolist()]


def _unpack_by_hand(fmt: str, data: torch.Tensor, k: int) -> list[list[int]]:
    """Ternary rows from packed data, one Python int at a time."""
    rows = []
    for row in data.tolist():
        codes: list[int] = []
        if fmt == "i2":  # 32-byte groups: byte j holds weights j, j+32, j+64, j+96 of its 128-weight block
            for b0 in range(0, len(row), 32):
                codes += [(row[b0 + j] >> (2 * q)) & 3 for q in range(4) for j in range(32)]
        elif fmt == "tq1":  # byte = sum_i c_i * 3**i
            codes += [(byte // 3**i) % 3 for byte in row for i in range(5)]
        else:  # i2g: int32 words, weight 16t + j in bits 2j..2j+1
            codes += [((word & 0xFFFFFFFF) >> (2 * j)) & 3 for word in row for j in range(16)]
        rows.append([c - 1 for c in codes[:k]])
    return rows


def test_formats_match_hand_worked_bytes():
    w = torch.zeros(1, 130, dtype=torch.int8)  # K = 130: i2/i2g pad to 256, tq1 to 130
    w[0, [0, 33, 96, 129]] = torch.tensor([1, -1, 1, -1], dtype=torch.int8)
    w[0, 15] = -1
    i2 = reference.pack_i2(w)[0].tolist()
    assert len(i2) == 64 and i2[0] == 2 | 1 << 2 | 1 << 4 | 2 << 6  # weights 0, 32, 64, 96 = +1, 0, 0, +1
    assert i2[1] == 1 | 0 << 2 | 1 << 4 | 1 << 6 and i2[15] == 0b01010100  # weight 33 = -1; weight 15 = -1
    assert i2[32 + 1] == 0b01010100 and i2[32] == 0x55 and set(i2[34:]) == {0x55}  # 129 = -1; padding: code 1
    tq1 = reference.pack_tq1(w)[0].tolist()
    assert len(tq1) == 26 and tq1[0] == 2 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81 and tq1[3] == 0 + 3 + 9 + 27 + 81
    assert tq1[6] == 1 + 3 + 9 + 0 * 27 + 81  # weights 15 and 33 = -1
    assert tq1[25] == 1 + 1 * 3 + 1 * 9 + 1 * 27 + 0 * 81  # weights 125..129, the last one -1
    i2g = reference.pack_i2g(w)[0].tolist()
    assert len(i2g) == 16 and i2g[0] == 0x55555556 - (1 << 30)  # weight 0 = +1 (code 2), weight 15 = -1 (code 0)
    assert i2g[2] == 0x55555555 - (1 << 2) and i2g[6] == 0x55555555 + (1 << 0)  # weight 33 = -1, 96 = +1
    assert i2g[8] == 0x55555555 - (1 << 2) and set(i2g[9:]) == {0x55555555}
    plus = reference.pack_i2g(torch.ones(1, 16, dtype=torch.int8))[0, 0].item()
    assert plus == 0xAAAAAAAA - (1 << 32)  # all +1: bit 31 set, so a negative int32


@given(n=st.integers(1, 6), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       fmt=st.sampled_from(["i2", "tq1", "i2g"]))
def test_reference_packers_against_hand_unpack(n, k, seed, fmt):
    wt = _ternary(n, k, seed)
    pack = {"i2": reference.pack_i2, "tq1": reference.pack_tq1, "i2g": reference.pack_i2g}[fmt]
    unpack = {"i2": reference.unpack_i2, "tq1": reference.unpack_tq1, "i2g": reference.unpack_i2g}[fmt]
    data = pack(wt)
    assert _unpack_by_hand(fmt, data, k) == wt.tolist()
    assert torch.equal(unpack(data, k), wt)
    assert data.shape == K.get_format(fmt).data_shape(n, k)


# ------------------------------------------------------------------------------------------- bit-exact kernels
@given(w=weights)
def test_quantize_weight_bit_exact(w):
    wt, gamma = cpu_pack.quantize_weight(w)
    ref_wt, ref_gamma = reference.weight_quant(w)
    assert wt.dtype == torch.int8 and gamma.dtype == torch.float32 and gamma.dim() == 0
    assert torch.equal(wt, ref_wt)
    assert torch.equal(gamma, ref_gamma)


@given(w=weights, fmt=st.sampled_from(["i2", "tq1"]))
def test_pack_bytes_and_round_trip(w, fmt):
    ref_wt, ref_gamma = reference.weight_quant(w)
    pw = cpu_pack.pack(ref_wt, ref_gamma, fmt)
    assert torch.equal(pw.data, REF_PACK[fmt](ref_wt))
    assert pw.shape == tuple(w.shape) and pw.format == fmt and torch.equal(pw.gamma, ref_gamma)
    assert torch.equal(cpu_pack.unpack(pw), ref_wt)
    fused = cpu_pack.quantize_and_pack(w, fmt)
    assert torch.equal(fused.data, pw.data) and torch.equal(fused.gamma, ref_gamma)


@given(
    n=st.integers(1, 20),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(["i2", "tq1"]),
)
def test_unpack_any_bytes_matches_reference(n, k, seed, fmt):
    """Unpack agrees with the reference on every byte value, including tq1 bytes above 242."""
    shape = K.get_format(fmt).data_shape(n, k)
    data = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    pw = PackedWeight(data, torch.tensor(1.0), (n, k), fmt)
    assert torch.equal(cpu_pack.unpack(pw), REF_UNPACK[fmt](data, k))


@given(n=st.integers(1, 16), k=st.integers(1, 260), seed=st.integers(0, 2**32 - 1))
def test_strided_ternary_input(n, k, seed):
    wt = _ternary(n, k, seed)
    for fmt in ("i2", "tq1"):
        assert torch.equal(cpu_pack.pack(wt.T.contiguous().T, 0.5, fmt).data, REF_PACK[fmt](wt))


def test_all_zero_weights_clamp_gamma():
    for dtype in FLOATS:
        w = torch.zeros(3, 7, dtype=dtype)
        wt, gamma = cpu_pack.quantize_weight(w)
        assert gamma.item() == np.float32(reference.EPS) and not wt.any()
        assert torch.equal(gamma, reference.weight_quant(w)[1])


@pytest.mark.parametrize("dtype", FLOATS)
def test_half_way_ties_round_to_even(dtype):
    """gamma is exactly 1 here, so w / gamma hits +-0.5 (-> 0) and +-1.5 (-> +-2, clipped to +-1) exactly."""
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [1.0, -1.0, 0.25, 1.75]], dtype=dtype)
    wt, gamma = cpu_pack.quantize_weight(w)
    assert gamma.item() == 1.0
    assert wt.tolist() == [[0, 0, 1, -1], [1, -1, 0, 1]]
    assert torch.equal(wt, reference.weight_quant(w)[0])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_match_reference(dtype, bad):
    w = torch.randn(4, 9).to(dtype)
    w[1, 3] = bad
    wt, gamma = cpu_pack.quantize_weight(w)
    ref_wt, ref_gamma = reference.weight_quant(w)
    assert torch.equal(wt, ref_wt)
    torch.testing.assert_close(gamma, ref_gamma, rtol=0, atol=0, equal_nan=True)


def test_fp16_every_code_widens_exactly():
    """All 65536 fp16 codes (subnormals, inf, nan) go through the in-kernel widening like torch's .float()."""
    w = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(256, 256)
    finite = w[torch.isfinite(w).all(dim=1)]
    for x in (w, finite, finite[:, :100] * 0, w.nan_to_num(0.0)):
        wt, gamma = cpu_pack.quantize_weight(x)
        ref_wt, ref_gamma = reference.weight_quant(x)
        assert torch.equal(wt, ref_wt)
        torch.testing.assert_close(gamma, ref_gamma, rtol=0, atol=0, equal_nan=True)
    wb = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    wb = wb[torch.isfinite(wb).all(dim=1)]
    assert torch.equal(cpu_pack.quantize_weight(wb)[0], reference.weight_quant(wb)[0])


# ---------------------------------------------------------------------------------------- public API + repack
@given(w=weights, fmt=st.sampled_from(["i2", "tq1"]))
def test_public_api_matches_reference(w, fmt):
    pw = K.pack(w, fmt)
    ref_wt, ref_gamma = reference.weight_quant(w)
    assert torch.equal(pw.data, REF_PACK[fmt](ref_wt)) and torch.equal(pw.gamma, ref_gamma)
    wt, gamma = K.unpack(pw)
    assert torch.equal(wt, ref_wt) and gamma is pw.gamma


@given(n=st.integers(1, 24), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_repack_round_trip(n, k, seed):
    wt = _ternary(n, k, seed)
    i2 = K.pack_ternary(wt, 0.25, "i2")
    tq1 = K.repack(i2, "tq1")
    assert tq1.format == "tq1" and torch.equal(tq1.data, reference.pack_tq1(wt))
    back = K.repack(tq1, "i2")
    assert torch.equal(back.data, i2.data) and torch.equal(back.gamma, i2.gamma)


@given(
    n=st.integers(1, 20),
    k=st.one_of(st.integers(1, 300), st.sampled_from([126, 127, 128, 129, 255, 256])),
    seed=st.integers(0, 2**32 - 1),
    src=st.sampled_from(["i2", "tq1"]),
)
def test_transcode_matches_unpack_then_pack(n, k, seed, src):
    """Direct i2 <-> tq1 equals the reference round trip, even for arbitrary bytes in the padding."""
    dst = "tq1" if src == "i2" else "i2"
    rng = np.random.default_rng(seed)
    if src == "i2":  # any code 0..3 in the padding, only valid codes 0..2 in the real weights
        full = torch.from_numpy(rng.integers(-1, 3, (n, reference.padded_k(k)), np.int8))
        data = reference.pack_i2(torch.cat([full[:, :k].clamp(max=1), full[:, k:]], dim=1))
    else:  # every byte value, including those above 242
        data = torch.from_numpy(rng.integers(0, 256, K.get_format(src).data_shape(n, k), np.uint8))
    pw = PackedWeight(data, torch.tensor(0.5), (n, k), src)
    out = cpu_pack.transcode(pw, dst)
    assert out.format == dst and out.shape == (n, k) and torch.equal(out.gamma, pw.gamma)
    assert torch.equal(out.data, REF_PACK[dst](REF_UNPACK[src](data, k)))
    assert cpu_pack.transcode(pw, src) is pw


def _i2_with_junk_padding(n: int, k: int, seed: int) -> PackedWeight:
    """A random (N, K) i2 weight whose padding holds any code 0..3 (only valid codes in the real weights)."""
    rng = np.random.default_rng(seed)
    full = torch.from_numpy(rng.integers(-1, 3, (n, reference.padded_k(k)), np.int8))
    data = reference.pack_i2(torch.cat([full[:, :k].clamp(max=1), full[:, k:]], dim=1))
    return PackedWeight(data, torch.tensor(0.25), (n, k), "i2")


@given(
    n=st.one_of(st.integers(1, 300), st.sampled_from([127, 128, 129, 256, 257])),
    k=st.one_of(st.integers(1, 300), st.sampled_from([126, 127, 128, 129, 255, 256])),
    seed=st.integers(0, 2**32 - 1),
)
def test_transpose_packed_is_the_packed_transpose(n, k, seed):
    """i2 (N, K) -> i2 (K, N) of Wt^T, same gamma, canonical padding (code 1) whatever the input's padding holds;
    transposing twice gives the canonical input back."""
    pw = _i2_with_junk_padding(n, k, seed)
    out = K.transpose_packed(pw)
    assert out.format == "i2" and out.shape == (k, n) and torch.equal(out.gamma, pw.gamma)
    assert torch.equal(out.data, reference.pack_i2(reference.unpack_i2(pw.data, k).t().contiguous()))
    assert torch.equal(K.transpose_packed(out).data, reference.pack_i2(reference.unpack_i2(pw.data, k)))


@pytest.mark.parametrize(("n", "k"), [(1, 1), (129, 5), (40, 300)])
def test_transpose_packed_generic_path_agrees(n, k, monkeypatch):
    """The unpack / transpose / pack fallback (other backends and formats) gives the Numba transposer's bytes."""
    pw = _i2_with_junk_padding(n, k, seed=n * k)
    fast = K.transpose_packed(pw)
    monkeypatch.setattr(K, "backend_for", lambda device: "reference")
    generic = K.transpose_packed(pw)
    assert torch.equal(generic.data, fast.data) and generic.shape == fast.shape == (k, n)


def test_transpose_packed_bad_inputs():
    with pytest.raises(TypeError, match="PackedWeight"):
        K.transpose_packed(torch.zeros(2, 32, dtype=torch.uint8))
    tq1 = K.pack(torch.randn(3, 10), "tq1")
    with pytest.raises(ValueError, match="i2"):
        cpu_pack.transpose(tq1)


def test_transcode_rejects_corrupt_i2():
    data = torch.full((2, 32), 0xFF, dtype=torch.uint8)  # code 3 everywhere
    with pytest.raises(ValueError, match="outside"):
        cpu_pack.transcode(PackedWeight(data, torch.tensor(1.0), (2, 128), "i2"), "tq1")


def test_state_round_trip():
    pw = cpu_pack.quantize_and_pack(torch.randn(5, 131), "tq1")
    again = PackedWeight.from_state(pw.state())
    assert torch.equal(again.data, pw.data) and torch.equal(again.gamma, pw.gamma)
    assert (again.shape, again.format, again.version) == (pw.shape, pw.format, pw.version)


def test_respects_torch_thread_count():
    """Above the serial threshold the packer runs on torch's thread count (capped by NUMBA_NUM_THREADS); below it
    on one thread."""
    from bitnet_fast.kernels import tuning

    before = torch.get_num_threads()
    big = torch.randn(1024, tuning.SERIAL_WORK // 1024 + 1)
    try:
        for want in (2, 1):
            torch.set_num_threads(want)
            cpu_pack.quantize_weight(big)
            assert numba.get_num_threads() == min(want, numba.config.NUMBA_NUM_THREADS)
            cpu_pack.quantize_weight(torch.randn(4, 8))
            assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- validation / errors
def _state(fmt: str = "i2") -> dict[str, torch.Tensor]:
    return cpu_pack.quantize_and_pack(torch.randn(4, 200), fmt).state()


@pytest.mark.parametrize(
    ("edit", "exc", "words"),
    [
        (lambda s: s.update(data=s["data"][:, :-1]), ValueError, "truncated"),
        (lambda s: s.update(data=s["data"].reshape(-1)[:-3]), ValueError, "truncated"),
        (lambda s: s.update(data=s["data"].to(torch.int16)), TypeError, "dtype"),
        (lambda s: s["header"].__setitem__(0, LAYOUT_VERSION + 1), ValueError, "layout version"),
        (lambda s: s["header"].__setitem__(3, 99), ValueError, "unknown format id 99"),
        (lambda s: s.pop("gamma"), ValueError, "missing ['gamma']"),
        (lambda s: s.update(header=s["header"][:3]), ValueError, "header has 3 fields"),
        (lambda s: s.update(gamma=torch.ones(2)), ValueError, "gamma"),
    ],
)
def test_from_state_rejects_bad_state(edit, exc, words):
    state = _state()
    edit(state)
    with pytest.raises(exc) as info:
        PackedWeight.from_state(state, where="layers.0.q_proj")
    assert words in str(info.value)
    assert "layers.0.q_proj" in str(info.value)


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda: cpu_pack.quantize_weight(torch.ones(3, 4, dtype=torch.int32)), TypeError, "w has dtype torch.int32"),
        (lambda: cpu_pack.quantize_weight(torch.ones(2, 3, 4)), ValueError, "w must be 2-D"),
        (lambda: cpu_pack.quantize_weight(torch.ones(4)), ValueError, "w must be 2-D"),
        (lambda: cpu_pack.quantize_weight(torch.ones(0, 4)), ValueError, "must be positive"),
        (lambda: cpu_pack.quantize_weight(np.ones((2, 2))), TypeError, "torch.Tensor"),
        (lambda: cpu_pack.quantize_and_pack(torch.ones(2, 2, dtype=torch.float64)), TypeError, "float64"),
        (lambda: cpu_pack.quantize_and_pack(torch.ones(2, 2), "q4"), ValueError, "fmt='q4'"),
        (lambda: cpu_pack.pack(torch.ones(2, 2), 1.0, "i2"), TypeError, "wt has dtype torch.float32"),
        (lambda: cpu_pack.pack(torch.full((2, 2), 2, dtype=torch.int8), 1.0), ValueError, "outside {-1, 0, 1}"),
        (lambda: cpu_pack.pack(torch.full((2, 7), -2, dtype=torch.int8), 1.0, "tq1"), ValueError, "outside"),
        (lambda: cpu_pack.pack(torch.zeros(2, 2, dtype=torch.int8), torch.ones(3)), ValueError, "single scale"),
        (lambda: cpu_pack.unpack(torch.zeros(2, 2)), TypeError, "PackedWeight"),
        (lambda: K.quantize_weight(torch.ones(3, 4, dtype=torch.int32)), TypeError, "dtype"),
        (lambda: K.pack(torch.ones(3)), ValueError, "dims"),
    ],
)
def test_bad_input_is_a_clear_error(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)
