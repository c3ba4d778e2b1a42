"""Side-by-side GPU benchmark: bitnet-fast's Triton bitlinear vs torch bf16 F.linear (cuBLAS) and torch._int_mm.

    python tools/bench_gpu.py                      # the issue's grid on the current CUDA device
    python tools/bench_gpu.py --ms 1 --shapes 8192x28672
    python tools/bench_gpu.py --interpret-smoke    # tiny CPU shapes under TRITON_INTERPRET=1: tests the logic only
    python tools/bench_gpu.py --compile-check      # no GPU needed: compile every kernel for sm_90 with ptxas

All three run in one process on the same inputs (timed with triton.testing.do_bench, median). "ours" is the
full bitlinear: activation quantization + packed-ternary matmul + epilogue, bf16 out. %HBM counts only the
packed weight bytes read by our GEMV (M <= 16) against the device's peak bandwidth. torch._int_mm needs
M > 16, so at M <= 16 it runs on 32 rows (marked *): an upper bound on what int8 cuBLASLt can do there.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import torch

MS = (1, 16, 2048, 4096)
SHAPES = ((2048, 2048), (2048, 5632), (4096, 4096), (8192, 28672))  # (K, N)
SMOKE_MS, SMOKE_SHAPES = (1, 16, 20), ((200, 40),)  # K = 200: a partial 128-block
HBM_PEAK_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100": 2039, "L40S": 864, "A10": 600, "4090": 1008}


def hbm_peak_gbps(device_name: str) -> float | None:
    """Nominal peak HBM bandwidth by device-name substring (first match wins); None when unknown."""
    return next((v for k, v in HBM_PEAK_GBPS.items() if k in device_name), None)


def make_timer(smoke: bool):
    if smoke:  # the interpreter: one call, wall clock (no meaning as a speed)
        def timer(fn) -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return timer
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_case(m: int, k: int, n: int, ops, timer, device: str) -> dict:
    """Time ours / bf16 / int8 on one (M, K, N) and spot-check ours' int32 product exactly."""
    g = torch.Generator(device="cpu").manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device, torch.bfloat16)
    pw = ops.pack(w)
    xq, _ = ops.quantize_activations(x)
    wt = ops.unpack(pw)
    cols = min(n, 64)  # exact check on a slice: int sums < 2**24 are exact in fp32
    exact = torch.equal(ops.matmul_int(xq, pw)[:, :cols].float(), xq.float() @ wt[:cols].float().T)
    m8 = max(m, 32)
    a8 = torch.randint(-128, 128, (m8, k), dtype=torch.int8, device=device)
    b8 = wt.T  # (K, N) view of an (N, K) row-major matrix: the column-major operand cuBLASLt prefers
    res = {"M": m, "K": k, "N": n, "exact": exact, "int8_padded": m8 != m}
    res["ours"] = timer(lambda: ops.bitlinear(x, pw))
    res["bf16"] = timer(lambda: torch.nn.functional.linear(x, w))
    try:
        res["int8"] = timer(lambda: torch._int_mm(a8, b8))
    except RuntimeError as e:  # e.g. a shape/device cuBLASLt (or this CPU build) does not take
        res["int8"], res["int8_error"] = None, str(e).splitlines()[0]
    res["weight_bytes"] = pw.data.numel() * pw.data.element_size()
    return res


def report(rows: list[dict], peak_gbps: float | None) -> None:
    head = (f"{'case':>22} {'ours ms':>9} {'bf16 ms':>9} {'int8 ms':>9} {'ours TF':>8} {'bf16 TF':>8} "
            f"{'%HBM':>6} {'ours/bf16':>9} {'ours/int8':>9} exact")
    print(head)
    for r in rows:
        flop = 2 * r["M"] * r["K"] * r["N"]
        hbm = ""
        if r["M"] <= 16 and peak_gbps:
            hbm = f"{100 * r['weight_bytes'] / (r['ours'] * 1e-3) / (peak_gbps * 1e9):.0f}"
        int8 = "n/a" if r["int8"] is None else f"{r['int8']:.4f}" + ("*" if r["int8_padded"] else "")
        vs8 = "n/a" if r["int8"] is None else f"{r['int8'] / r['ours']:.2f}x"
        case = f"M={r['M']} K={r['K']} N={r['N']}"
        print(f"{case:>22} {r['ours']:9.4f} {r['bf16']:9.4f} {int8:>9} {flop / r['ours'] / 1e9:8.1f} "
              f"{flop / r['bf16'] / 1e9:8.1f} {hbm:>6} {r['bf16'] / r['ours']:8.2f}x {vs8:>9} {r['exact']}")
    print("ours/bf16 and ours/int8 are speedups (> 1 means ours is faster); * = _int_mm ran on 32 rows")
    for r in rows:
        if r["M"] == 1 and (r["K"], r["N"]) == (8192, 28672):
            bw = 100 * r["weight_bytes"] / (r["ours"] * 1e-3) / (peak_gbps * 1e9) if peak_gbps else float("nan")
            print(f"target decode M=1 8192x28672: {r['bf16'] / r['ours']:.2f}x bf16 (>= 5), {bw:.0f}% HBM (>= 60)")
        if r["M"] == 4096:
            print(f"target prefill M=4096 {r['K']}x{r['N']}: {r['bf16'] / r['ours']:.2f}x bf16 (>= 1.3)")


# ------------------------------------------------------------------------------------- ahead-of-time compile
_I, _P = "i32", "*"
_GEMV = dict(x_ptr="*i8", s_ptr="*fp32", w_ptr="*i32", gamma_ptr="*fp32", bias_ptr="*fp32", out_ptr="*bf16",
             acc_ptr="*i32", M=_I, N=_I, K=_I, KW=_I, stride_xm=_I, stride_xk=1, stride_wn=_I, stride_ww=1,
             stride_om=_I)
_GEMM = {**{k: v for k, v in _GEMV.items() if k != "acc_ptr"}, "xsum_ptr": "*i32", "M_BUCKET": _I}
_GRAD = dict(g_ptr="*bf16", w_ptr="*i32", gamma_ptr="*fp32", out_ptr="*fp32", M=_I, N=_I, K=_I, KW=_I, M_BUCKET=_I,
             stride_gm=_I, stride_gn=1, stride_wn=_I, stride_ww=1, stride_om=_I)
_DIV16 = {"N", "K", "KW", "stride_xm", "stride_wn", "stride_om", "stride_gm", "stride_on"}  # true at benchmark shapes


def _compile_cases(G, all_configs: bool):
    """(label, kernel, arg types/constants, num_warps, num_stages) for every kernel variant the backend launches."""
    def tuned(kernel, label, types, consts, keep=lambda c: True, variant=False):
        """Every config with all_configs, else the first; a `variant` (other flags of a kernel already compiled
        in every config: only the split-K store differs) always in its first config."""
        # the config lists themselves, not kernel.configs (which BITNET_FAST_TRITON_AUTOTUNE=0 cuts to the first)
        every = {G._gemv1_kernel: G.GEMV_CONFIGS, G._gemv_kernel: G.GEMV_CONFIGS, G._gemm_kernel: G.GEMM_CONFIGS,
                 G._grad_input_kernel: G.GRAD_CONFIGS, G._grad_weight_kernel: G.GRAD_CONFIGS}[kernel]
        configs = [c for c in every if keep(c)]
        for c in configs if all_configs and not variant else configs[:1]:
            spec = {**types, **consts, **c.kwargs}
            yield f"{label} {c.kwargs} w{c.num_warps} s{c.num_stages}", kernel, spec, c.num_warps, c.num_stages

    base = dict(SPLIT_K=1, EPILOGUE=True, HAS_BIAS=False)
    gemv1 = dict(xp_ptr="*i32", s_ptr="*fp32", w_ptr="*i32", gamma_ptr="*fp32", bias_ptr="*bf16", out_ptr="*bf16",
                 acc_ptr="*i32", N=_I, KW=_I, stride_wn=_I, stride_ww=1, stride_om=_I)
    flags1 = dict(SPLIT_K=1, EPILOGUE=True, HAS_BIAS=True, USE_DP4A=True)
    yield from tuned(G._gemv1_kernel, "gemv M=1 dp4a", gemv1, flags1)
    yield from tuned(G._gemv1_kernel, "gemv M=1 dp4a split-K", gemv1, {**flags1, "SPLIT_K": 4, "EPILOGUE": False},
                     variant=True)
    yield ("pack_x (M=1 prologue, quantizing)", G._pack_x_kernel, dict(x_ptr="*bf16", s_ptr="*fp32", xp_ptr="*i32",
           K=_I, KW=_I, stride_xk=1, QUANT=True, BLOCK_K=4096, BLOCK_W=64), 8, 1)
    yield from tuned(G._gemv_kernel, "gemv M<=16 split-K int", _GEMV, {**base, "SPLIT_K": 4, "EPILOGUE": False},
                     variant=True)
    yield from tuned(G._gemv_kernel, "gemv M<=16 + bias", _GEMV, {**base, "HAS_BIAS": True})
    yield from tuned(G._gemm_kernel, "gemm", _GEMM, dict(EPILOGUE=True, HAS_BIAS=True))
    yield from tuned(G._grad_input_kernel, "grad_input bf16", _GRAD, dict(IEEE=False),
                     lambda c: not G._prune_grad_input([c], {}, IEEE=True))
    yield from tuned(G._grad_input_kernel, "grad_input fp32", {**_GRAD, "g_ptr": "*fp32"}, dict(IEEE=True),
                     lambda c: G._prune_grad_input([c], {}, IEEE=True))
    gw = dict(g_ptr="*bf16", xq_ptr="*i8", s_ptr="*fp32", out_ptr="*fp32", M=_I, N=_I, K=_I, M_BUCKET=_I,
              stride_gm=_I, stride_gn=1, stride_xm=_I, stride_xk=1, stride_on=_I)
    yield from tuned(G._grad_weight_kernel, "grad_weight bf16", gw, {},
                     lambda c: not G._prune_grad_input([c], {}, IEEE=True))
    yield ("act_quant", G._act_quant_kernel, dict(x_ptr="*bf16", xq_ptr="*i8", s_ptr="*fp32", xsum_ptr="*i32",
           K=_I, stride_xm=_I,
           stride_xk=1, stride_qm=_I, BLOCK_K=4096), 8, 1)
    yield "abs_sum", G._abs_sum_kernel, dict(w_ptr="*bf16", part_ptr="*fp64", numel="i64", BLOCK=4096), 4, 1
    yield ("ternarize", G._ternarize_kernel, dict(w_ptr="*bf16", gamma_ptr="*fp32", wt_ptr="*i8", numel="i64",
           BLOCK=4096), 4, 1)
    yield ("pack", G._pack_kernel, dict(wt_ptr="*i8", out_ptr="*i32", K=_I, KW=_I, stride_wn=_I, stride_wk=1,
           BLOCK_W=64), 4, 1)
    yield ("unpack", G._unpack_kernel, dict(w_ptr="*i32", wt_ptr="*i8", K=_I, KW=_I, stride_wn=_I, stride_ww=1,
           BLOCK_W=64), 4, 1)
    yield ("split-K epilogue", G._epilogue_kernel, dict(acc_ptr="*i32", s_ptr="*fp32", gamma_ptr="*fp32",
           bias_ptr="*bf16", out_ptr="*bf16", M=_I, N=_I, stride_om=_I, HAS_BIAS=True, BLOCK_N=1024), 4, 1)


def _loop_instructions(sass: str) -> int:
    """SASS instructions in the largest loop (the K loop): the span of the longest backward branch."""
    addrs, best = [], 0
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*)", line)
        if m:
            addrs.append(int(m.group(1), 16))
            target = re.search(r"BRA\s+(?:!?U?P\d, )?0x([0-9a-f]+)", m.group(2))
            if target and int(target.group(1), 16) < addrs[-1]:
                lo = int(target.group(1), 16)
                best = max(best, sum(1 for a in addrs if a >= lo))
    return best


def compile_check(arch: int = 90, all_configs: bool = False) -> int:
    """Compile the backend's kernels for sm_<arch> with Triton's bundled ptxas (no GPU needed) and print the
    registers / spill bytes / shared memory of each, and for the weight-streaming kernels the SASS instructions
    per thread per weight in the K loop: catches compiled-mode errors the interpreter cannot, and shows where
    a kernel spends issue slots."""
    import tempfile

    import triton
    from bitnet_fast.kernels import gpu as G
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    failures, t0 = 0, time.perf_counter()
    print(f"{'kernel':<84} {'regs':>5} {'spill B':>8} {'smem B':>7} {'instr/w':>8}")
    for label, kernel, spec, warps, stages in _compile_cases(G, all_configs):
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap the autotuner
            fn = fn.fn
        consts = {k: v for k, v in spec.items() if not (isinstance(v, str))}
        sig = {a: "constexpr" if a in consts else spec[a] for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in consts and (spec[a].startswith(_P) or a in _DIV16)}
        try:
            opts = backend.parse_options({"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})
            cc = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs), target=target, options=opts.__dict__)
        except Exception as e:  # report every failing variant, then fail
            failures += 1
            print(f"{label:<84} FAILED: {str(e).splitlines()[-1] if str(e) else type(e).__name__}")
            continue
        if spec.get("USE_DP4A") and "dp4a.u32.s32" not in cc.asm["ptx"]:  # the instruction the interpreter emulates
            failures += 1
            print(f"{label:<84} FAILED: no dp4a.u32.s32 in the PTX")
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cc.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        per_w = ""
        if "w_ptr" in spec and "BLOCK_KW" in spec:  # weights unpacked per thread per K-loop iteration
            weights = spec["BLOCK_N"] * spec["BLOCK_KW"] * 16 / (32 * warps)
            per_w = f"{_loop_instructions(sass) / weights:.2f}"
        fields = dict(kv.split(":") for line in usage.splitlines() if "REG:" in line for kv in line.split()
                      if ":" in kv and kv.split(":")[1].isdigit())
        spill = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
        print(f"{label:<84} {fields.get('REG', '?'):>5} {spill:>8} {cc.metadata.shared:>7} {per_w:>8}")
    print(f"sm_{arch}: {failures} failures, {time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


class _Ops:
    """The kernels under test: the public dispatch on CUDA, gpu.py directly on CPU under the interpreter."""

    def __init__(self, smoke: bool):
        import bitnet_fast.kernels as K

        if smoke:
            from bitnet_fast.kernels import gpu as G

            self.pack = lambda w: G.pack(*G.quantize_weight(w), "i2g")
            self.unpack, self.matmul_int = G.unpack, G.matmul_int
            self.quantize_activations = G.quantize_activations
            self.bitlinear = lambda x, pw: G.bitlinear(x, pw, None, torch.bfloat16)
        else:
            self.pack, self.unpack = K.pack, lambda pw: K.unpack(pw)[0]
            self.matmul_int, self.quantize_activations = K.matmul_int, K.quantize_activations
            self.bitlinear = lambda x, pw: K.bitlinear(x, pw, None, torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="comma-separated KxN")
    p.add_argument("--hbm-gbps", type=float, default=None, help="peak HBM GB/s (default: by device name)")
    p.add_argument("--interpret-smoke", action="store_true", help="tiny CPU shapes under TRITON_INTERPRET=1")
    p.add_argument("--compile-check", type=int, nargs="?", const=90, metavar="ARCH",
                   help="no GPU needed: AOT-compile every kernel for sm_ARCH (default 90) and print resources")
    p.add_argument("--all-configs", action="store_true", help="with --compile-check: every autotune config")
    args = p.parse_args(argv)
    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--compile-check needs compiled kernels: unset TRITON_INTERPRET")
        return compile_check(args.compile_check, args.all_configs)
    smoke = args.interpret_smoke
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton kernels are defined
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env)
    if not smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here, so there is nothing to time (GPU timings are owed until this runs "
              "on a GPU machine). Use --interpret-smoke to exercise the logic on CPU.", file=sys.stderr)
        return 2
    ms = SMOKE_MS if smoke else tuple(int(v) for v in args.ms.split(","))
    shapes = SMOKE_SHAPES if smoke else tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    device = "cpu" if smoke else "cuda"
    name = "CPU (Triton interpreter: timings meaningless)" if smoke else torch.cuda.get_device_name()
    peak = args.hbm_gbps or (1.0 if smoke else hbm_peak_gbps(name))
    print(f"device: {name}; peak HBM: {peak} GB/s; torch {torch.__version__}")
    ops, timer = _Ops(smoke), make_timer(smoke)
    rows = [bench_case(m, k, n, ops, timer, device) for k, n in shapes for m in ms]
    report(rows, peak)
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
