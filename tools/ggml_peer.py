"""ctypes wrapper around tools/ggml_mulmat.c: ggml's CPU mul_mat (TQ2_0 / TQ1_0 ternary weights) as a contender.

llama.cpp's ggml is the CPU speed to beat for ternary weights: its TQ2_0 (2 bits/weight) and TQ1_0 (1.69 bits)
kernels quantize the f32 activation to q8_K and run int8 dot products. `GgmlMulMat(m, k, n, "tq2_0")` is one
y = x @ W^T of that kind, with one reused graph, plan and threadpool, so a call costs what llama.cpp pays per matmul.
The library comes from `python tools/llamacpp_build.py` (see there); `available(isa)` says whether it is built.
Only one build flavour can be loaded per process (both export libggml.so).

    python tools/ggml_peer.py [--cold] [--ms 1,8] [--shapes 4096x4096] [--threads 2] [--isa native]

prints median (and min) ms per call of ggml TQ2_0 and TQ1_0, timed in interleaved rounds, after a correctness
check. The min is the call least slowed by other processes on a shared machine; there, give the run the CPU as
docs/kernels.md does: setsid bash -c 'echo -15 > /proc/self/autogroup; exec python tools/ggml_peer.py'.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:  # run from tools/ (python tools/x.py puts tools/ on sys.path) or imported as tools.ggml_peer
    from llamacpp_build import LIB_NAME, find_build
except ImportError:  # pragma: no cover
    from tools.llamacpp_build import LIB_NAME, find_build

NOT_BUILT = "ggml build not found ({isa}): run python tools/llamacpp_build.py --isa {isa}"
MS = [1, 8, 32, 128, 512]
SHAPES = [(4096, 4096), (2048, 5632), (5632, 2048), (2048, 2048), (2048, 256)]  # (K, N); TinyLlama's are K=2048/5632
_loaded: dict[str, ctypes.CDLL] = {}
_flush_buf: list[np.ndarray] = []  # 64 MiB, allocated on first use: more than the L3 a core sees


def available(isa: str = "native") -> bool:
    """True if the ggml build of flavour `isa` (with our libggml_mulmat.so) exists; never builds."""
    return find_build(isa) is not None


def build_info(isa: str = "native") -> dict:
    """peer_build.json of flavour `isa`: llama-cpp-python version, llama.cpp commit, cmake command, CPU features."""
    d = find_build(isa)
    if d is None:
        raise FileNotFoundError(NOT_BUILT.format(isa=isa))
    return json.loads((d / "peer_build.json").read_text())


def _lib(isa: str) -> ctypes.CDLL:
    if isa in _loaded:
        return _loaded[isa]
    if _loaded:
        raise RuntimeError(f"ggml flavour {next(iter(_loaded))!r} is already loaded; use one --isa per process")
    d = find_build(isa)
    if d is None:
        raise FileNotFoundError(NOT_BUILT.format(isa=isa))
    lib = ctypes.CDLL(str(Path(d) / LIB_NAME))
    vp, fp, i = ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int
    lib.gm_create.restype, lib.gm_create.argtypes = vp, [i, i, i, ctypes.c_char_p, i]
    lib.gm_run.restype, lib.gm_run.argtypes = i, [vp, i]
    for name in ("gm_set_input", "gm_get_output"):
        getattr(lib, name).restype, getattr(lib, name).argtypes = None, [vp, fp]
    for name in ("gm_set_weight", "gm_get_weight"):
        getattr(lib, name).restype, getattr(lib, name).argtypes = i, [vp, fp]
    lib.gm_free.restype, lib.gm_free.argtypes = None, [vp]
    lib.gm_weight_bytes.restype, lib.gm_weight_bytes.argtypes = ctypes.c_size_t, [vp]
    lib.gm_info.restype = ctypes.c_char_p
    _loaded[isa] = lib
    return lib


def _fptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class GgmlMulMat:
    """y = x @ W^T by ggml: x (m x k, f32, seeded normal), W (n x k, random ternary * 0.02 quantized to `qtype`).

    Calling the object runs one mul_mat (activation quantization included, as in llama.cpp)."""

    def __init__(self, m: int, k: int, n: int, qtype: str = "tq2_0", threads: int = 2, isa: str = "native",
                 seed: int = 0) -> None:
        self._lib = _lib(isa)
        self.m, self.k, self.n, self.qtype = m, k, n, qtype
        self._h = self._lib.gm_create(m, k, n, qtype.encode(), threads)
        if not self._h:
            raise ValueError(f"gm_create failed for M={m} K={k} N={n} type={qtype} (see stderr)")
        self.set_input(np.random.default_rng(seed).standard_normal((m, k), dtype=np.float32))

    def __call__(self) -> None:
        rc = self._lib.gm_run(self._h, 1)
        if rc:
            raise RuntimeError(f"ggml_graph_compute failed with status {rc}")

    def run(self, iters: int) -> None:
        """`iters` calls back to back in C (no Python overhead between them)."""
        if self._lib.gm_run(self._h, iters):
            raise RuntimeError("ggml_graph_compute failed")

    def set_input(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != (self.m, self.k):
            raise ValueError(f"x must be {(self.m, self.k)}, got {x.shape}")
        self._lib.gm_set_input(self._h, _fptr(x))

    def set_weight(self, w: np.ndarray) -> None:
        """Quantize an n x k float weight with ggml's quantize function for `qtype`."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.shape != (self.n, self.k) or self._lib.gm_set_weight(self._h, _fptr(w)):
            raise ValueError(f"set_weight: need an {(self.n, self.k)} weight quantizable to {self.qtype}")

    def weight(self) -> np.ndarray:
        """The stored weight, dequantized (what ggml multiplies by)."""
        w = np.empty((self.n, self.k), dtype=np.float32)
        if self._lib.gm_get_weight(self._h, _fptr(w)):
            raise RuntimeError(f"no dequantize for {self.qtype}")
        return w

    def output(self) -> np.ndarray:
        y = np.empty((self.m, self.n), dtype=np.float32)
        self._lib.gm_get_output(self._h, _fptr(y))
        return y

    @property
    def weight_bytes(self) -> int:
        return int(self._lib.gm_weight_bytes(self._h))

    def close(self) -> None:
        if getattr(self, "_h", None):
            self._lib.gm_free(self._h)
            self._h = None

    def __del__(self) -> None:
        self.close()


def _q8_k(x: np.ndarray) -> np.ndarray:
    """x after ggml's q8_K round trip (quantize_row_q8_K_ref): per 256 block, q = rint(-127/max * x), d = -max/127."""
    b = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    mx = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    iscale = np.divide(np.float32(-127), mx, out=np.zeros_like(mx), where=mx != 0)
    q = np.minimum(np.rint(iscale * b), 127)
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(mx), where=iscale != 0)
    return (q * d).reshape(x.shape)


def check(isa: str = "native", qtype: str = "tq2_0", m: int = 8, k: int = 1024, n: int = 256) -> float:
    """ggml's `qtype` output vs references; returns the relative error vs the float reference, raises if wrong.

    Tight (TQ1_0/TQ2_0, whose vec_dot_type is q8_K): against x after a q8_K round trip times the dequantized
    ternary weight (ggml's exact arithmetic up to float summation order). Loose (any type): against plain float
    x @ W^T, allowing the activation rounding (q8_K step max|x_block|/127: about 0.7% for normal data) with
    margin (2%)."""
    rng = np.random.default_rng(1)
    w = (rng.integers(-1, 2, (n, k)) * 0.03).astype(np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    g = GgmlMulMat(m, k, n, qtype, threads=2, isa=isa)
    g.set_weight(w)
    g.set_input(x)
    g()
    y, wd = g.output(), g.weight()
    g.close()
    tern = np.round(wd / np.abs(wd).max())
    if not np.array_equal(tern, w / 0.03):
        raise AssertionError(f"{qtype}: the dequantized weight is not the ternary weight that was set")
    ref = x.astype(np.float64) @ wd.T.astype(np.float64)
    ref_q = _q8_k(x).astype(np.float64) @ wd.T.astype(np.float64)
    tight = np.abs(y - ref_q).max() / np.abs(ref_q).max() if qtype.startswith("tq") else 0.0  # q8_K: TQ only
    loose = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    if tight > 1e-4 or loose > 2e-2:
        raise AssertionError(f"ggml {qtype} wrong: rel err {tight:.2e} vs q8_K reference, {loose:.2e} vs float")
    return float(loose)


def flush_caches() -> None:
    """Evict the CPU caches: write and read a 64 MiB buffer (untimed by the callers)."""
    if not _flush_buf:
        _flush_buf.append(np.zeros(64 << 20, dtype=np.uint8))
    np.add(_flush_buf[0], 1, out=_flush_buf[0])  # reads and writes every cache line


def time_rounds(fns: dict[str, Callable[[], object]], budget_s: float, burst: int, cold: bool = False,
                max_calls: int = 2000) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed interleaved: every round runs each fn for 10 ms untimed (the previous
    fn's OpenMP pool stops spinning, this one's is warm), then `burst` timed calls; rounds repeat for about
    `budget_s` so that background load hits all fns alike. `cold`: flush_caches() before every timed call."""
    for f in fns.values():  # first calls: JIT, plans, primitive caches
        f(), f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    first = next(iter(fns))
    start = time.perf_counter()
    while not times[first] or (time.perf_counter() - start < budget_s and len(times[first]) < max_calls):
        for name, f in fns.items():
            t_end = time.perf_counter() + 0.01
            while time.perf_counter() < t_end:
                f()
            for _ in range(burst):
                if cold:
                    flush_caches()
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return times


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in p.split("x")) for p in s.split(",")]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default="native", choices=("native", "avx2"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,KxN,...")
    ap.add_argument("--types", default="tq2_0,tq1_0", help="ggml weight types (default tq2_0,tq1_0)")
    ap.add_argument("--cold", action="store_true", help="flush the caches (64 MiB) before every timed call")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timing per (M, shape) (default 1.5)")
    ap.add_argument("--json", metavar="OUT", help="also write the rows (median and min ms) as JSON")
    args = ap.parse_args()
    if not available(args.isa):
        raise SystemExit(NOT_BUILT.format(isa=args.isa))
    types = args.types.split(",")
    info = build_info(args.isa)
    print(f"ggml {info['ggml_version']} (llama.cpp {info['llama_cpp_describe']}, llama-cpp-python "
          f"{info['llama_cpp_python']}), flavour {args.isa}, threads {args.threads}, {'cold' if args.cold else 'warm'}")
    print("features: " + ", ".join(f for f, v in info["ggml_cpu_features"].items() if v == 1))
    for t in types:
        print(f"check {t}: rel err vs float reference {check(args.isa, t):.2e} (q8_K activations)")
    print("| M | K | N | " + " | ".join(f"{t} ms | {t} min ms | {t} GB/s" for t in types) + " |")
    print("|---" * (3 + 3 * len(types)) + "|")
    rows = []
    for m in map(int, args.ms.split(",")):
        for k, n in _parse_shapes(args.shapes):
            fns = {t: GgmlMulMat(m, k, n, t, args.threads, args.isa) for t in types}
            burst = 5 if args.cold else (20 if m < 128 else 3)
            times = time_rounds(fns, args.budget * (1 + (m >= 128)), burst, cold=args.cold)
            cells, row = [], {"M": m, "K": k, "N": n}
            for t, g in fns.items():
                med, best = statistics.median(times[t]), min(times[t])
                cells.append(f"{med * 1e3:.3f} | {best * 1e3:.3f} | {g.weight_bytes / med / 1e9:.1f}")
                row.update({f"{t}_ms": med * 1e3, f"{t}_min_ms": best * 1e3, f"{t}_calls": len(times[t])})
                g.close()
            rows.append(row)
            print(f"| {m} | {k} | {n} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        out = {"build": info, "threads": args.threads, "cold": args.cold, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
