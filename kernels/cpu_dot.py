"""The inner loop of the CPU kernels: an int8 x ternary dot-product tile, emitted as LLVM IR per instruction set.

`make_dot(rows, cols)` returns a Numba intrinsic `dot(wp, i, xq, r, nblk, out, oc)` that writes, for t < rows
activation rows and s < cols weight rows, into a 2-D int32 array

    out[t, oc + s] = sum_k xq[r + t, k] * c[i + s, k]      over nblk i2 blocks of 128 weights,

where c = w + 1 in {0, 1, 2} are the unsigned i2 codes (the caller subtracts sum(x) once per row). Each
weight block is decoded once (shift + mask) per tile and reused for every activation row of the tile; each
activation vector is loaded once and reused for every weight row. Per instruction set:

    vnni512   512-bit `vpdpbusd` (u8 x s8 -> int32 accumulate); 64-byte loads span two blocks, so activations
              are stored pair-interleaved (`DOT_LAYOUT_PAIRS`); codes are decoded by masks only
    vnni      256-bit `vpdpbusd` (AVX-VNNI or AVX-512VL VNNI)
    avx2      `vpmaddubsw` (u8 x s8 -> pairwise int16) accumulated in int16 for CHUNK blocks (SPLIT_CHUNK in
              the decode tiles), then widened with `vpmaddwd`: one add per multiply
    portable  target-independent IR (zext/sext/mul/add) that LLVM lowers to whatever SIMD the target has

`make_outer_dot(rows, nv)` is the avx2 GEMM's outer-product tile on an interleaved copy of a weight panel:
vector lanes are outputs, so it needs no horizontal reduction (see its docstring).

The instruction set is read once from the host (`llvmlite`), or forced with BITNET_FAST_CPU_ISA; the code
can also be compiled for another CPU (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) and its assembly inspected.
"""

from __future__ import annotations

import os

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.ufunc.parallel import _launch_threads

from . import reference

ISAS = ("vnni512", "vnni", "avx2", "portable")
BLOCK = reference.I2_BLOCK  # 128 weights = 32 packed bytes
# The 1 x 1 decode tile prefetches the same block this many weight rows ahead: ~8-22 KB at K = 2048-5632, far
# enough for DRAM latency (2 threads, weights streamed from DRAM, in-process A/B against 1 row ahead: 3-14% faster
# at N x K = 4096x4096, 5632x2048, 2048x5632; warm 0-5%). A decode tile of several rows prefetches the next tile's
# rows as one linear stream (_Tile.block_vectors); GEMM tiles reuse their weights from L2 and prefetch 1 tile ahead.
PREFETCH_ROWS = 16
# avx2: int16 lanes collect 4 vpmaddubsw results (each in [-512, 508]) per block; 16 blocks stay within
# [-32768, 32512], so the int16 accumulators are widened every CHUNK blocks. The decode tiles (one activation row)
# split each pair's accumulator in two: quarters 0 and 2 (codes c) and quarters 1 and 3 (decoded as 4c by masks
# alone, lanes in [-2048, 2032]), widened every SPLIT_CHUNK blocks. Exact for valid codes (0..2).
CHUNK = 16
SPLIT_CHUNK = 8


def detect_isa(features: dict[str, bool] | None = None, forced: str | None = None) -> str:
    """The dot-product instruction set for a CPU with LLVM feature flags `features` (default: this host),
    unless `forced` (default: $BITNET_FAST_CPU_ISA) names one."""
    forced = (os.environ.get("BITNET_FAST_CPU_ISA", "") if forced is None else forced).strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"BITNET_FAST_CPU_ISA={forced!r} is not one of {ISAS}")
        return forced
    f = llvm_binding.get_host_cpu_features() if features is None else features
    if f.get("avx512vnni") and f.get("avx512bw"):
        return "vnni512"
    if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")):
        return "vnni"
    return "avx2" if f.get("avx2") else "portable"


ISA = detect_isa()
WIDE = 64 if ISA == "vnni512" else 32  # packed bytes per vector load
ACCS = 16 if ISA == "vnni512" else 8  # int32 vector accumulators per tile (32 zmm vs 16 ymm registers)
DOT_LAYOUT_PAIRS = WIDE == 64  # activations pair-interleaved per two blocks (see cpu_engine._dot_layout)

_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _fn(builder, fname: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), fname)


def _c64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _load(builder, addr, vtype):
    return builder.load(builder.inttoptr(addr, vtype.as_pointer()), align=1)


def _emit_loop(builder, start, stop, step: int, inits: list, body) -> list:
    """IR for `for b in range(start, stop, step)` carrying `inits` through `body(b, values) -> values`."""
    pre = builder.block
    loop, after = builder.append_basic_block("dot_loop"), builder.append_basic_block("dot_after")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop, after)
    builder.position_at_end(loop)
    b = builder.phi(_I64)
    carried = [builder.phi(v.type) for v in inits]
    new = body(b, carried)
    bn = builder.add(b, _c64(step))
    end = builder.block
    b.add_incoming(start, pre)
    b.add_incoming(bn, end)
    for phi, v0, v1 in zip(carried, inits, new, strict=True):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v1, end)
    builder.cbranch(builder.icmp_signed("<", bn, stop), loop, after)
    builder.position_at_end(after)
    final = [builder.phi(v.type) for v in inits]
    for phi, v0, v1 in zip(final, inits, new, strict=True):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v1, end)
    return final


def _decode(builder, wv, nbytes: int, mode: str) -> list:
    """The four code vectors of a packed vector. "shift": quarter q = (byte >> 2q) & 3; "masks": byte & (3 << 2q)
    (= 4**q * code, unscaled after the reduction); "pairs" (avx2): c0, 4 c1, c2, 4 c3 from two masks of the byte and
    two of it shifted by 4, 5 instructions where "shift" takes 7 (x86 has no byte shift: a 16-bit shift, whose bits
    from the next byte the masks drop)."""
    i8v = ir.VectorType(ir.IntType(8), nbytes)
    if mode == "pairs":
        i16v = ir.VectorType(ir.IntType(16), nbytes // 2)
        hi = builder.bitcast(builder.lshr(builder.bitcast(wv, i16v), ir.Constant(i16v, [4] * (nbytes // 2))), i8v)
        m1, m4 = ir.Constant(i8v, [3] * nbytes), ir.Constant(i8v, [12] * nbytes)
        return [builder.and_(wv, m1), builder.and_(wv, m4), builder.and_(hi, m1), builder.and_(hi, m4)]
    if mode == "masks":
        return [builder.and_(wv, ir.Constant(i8v, [3 << 2 * q] * nbytes)) for q in range(4)]
    mask = ir.Constant(i8v, [3] * nbytes)
    return [builder.and_(builder.lshr(wv, ir.Constant(i8v, [2 * q] * nbytes)) if q else wv, mask) for q in range(4)]


def _generic_dot(builder, acc, codes, xv):
    """Target-independent IR for acc + dot4(u8 codes, s8 x) into 8 int32 lanes."""
    i32x32 = ir.VectorType(ir.IntType(32), 32)
    p = builder.mul(builder.zext(codes, i32x32), builder.sext(xv, i32x32))
    for h in range(4):
        acc = builder.add(acc, builder.shuffle_vector(p, p, ir.Constant(_I32x8, list(range(8 * h, 8 * h + 8)))))
    return acc


class _Tile:
    """Addresses and accumulator bookkeeping of one rows x cols tile (IR emission helpers)."""

    def __init__(self, builder, w_addrs: list, x_addrs: list, isa: str, prefetch_ahead) -> None:
        self.b, self.w_addrs, self.x_addrs, self.isa = builder, w_addrs, x_addrs, isa
        self.pairs = len(w_addrs) * len(x_addrs)
        self.ahead = prefetch_ahead  # bytes from a weight row to the block it prefetches (a later tile's row)
        # a decode tile of several weight rows (consecutive in memory) prefetches them as one linear stream
        self.linear = len(x_addrs) == 1 and len(w_addrs) % 2 == 0

    def block_vectors(self, blk, nbytes: int, mode: str) -> tuple[list, list]:
        """(codes[s][q] per weight row, xs[t][q] per activation row) of the nbytes-wide vectors at block blk. Each
        weight load also prefetches a later tile's bytes (PREFETCH_ROWS ahead in the 1 x 1 decode tile): a GEMV
        streams its weights from DRAM, faster than the hardware prefetchers alone run ahead of it. A decode tile of
        several rows instead prefetches the next tile's rows as one linear stream, one cache line per 64 bytes it
        reads: per-row prefetches 4-32 rows ahead left the 1 x 4 tile 0.66-0.91x the 1 x 1 tile with the weights
        from DRAM (four short streams); this pattern 1.00-1.05x (Zen 3, in-process A/B)."""
        b = self.b
        i8v = ir.VectorType(ir.IntType(8), nbytes)
        prefetch = _fn(b, "llvm.prefetch.p0i8", ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
        codes = []
        linear = self.linear and nbytes == 32
        if linear:
            step = 32 * len(self.w_addrs)  # bytes of the tile's rows per block, rows i.. read as one region
            for j in range(0, step, 64):
                addr = b.add(self.w_addrs[0], b.add(b.mul(blk, _c64(step)), _c64(j)))
                ptr = b.inttoptr(b.add(addr, self.ahead), ir.IntType(8).as_pointer())
                b.call(prefetch, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        for w in self.w_addrs:
            addr = b.add(w, b.mul(blk, _c64(32)))
            if not linear:
                ptr = b.inttoptr(b.add(addr, self.ahead), ir.IntType(8).as_pointer())
                b.call(prefetch, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            codes.append(_decode(b, _load(b, addr, i8v), nbytes, mode))
        xs = []
        for x in self.x_addrs:
            base = b.add(x, b.mul(blk, _c64(BLOCK)))
            xs.append([_load(b, b.add(base, _c64(nbytes * q)), i8v) for q in range(4)])
        return codes, xs


def _hsum4(builder, vecs: list):
    """Lane sums of up to four int32x8 vectors as one int32x4 (lane j = sum(vecs[j])): two levels of
    vphaddd-style pairwise adds within 128-bit halves, then one add of the halves."""
    b = builder
    level = list(vecs) + [ir.Constant(_I32x8, None)] * (4 - len(vecs))
    for _ in range(2):
        level = [b.add(b.shuffle_vector(a, c, ir.Constant(_I32x8, [0, 2, 8, 10, 4, 6, 12, 14])),
                       b.shuffle_vector(a, c, ir.Constant(_I32x8, [1, 3, 9, 11, 5, 7, 13, 15])))
                 for a, c in zip(level[::2], level[1::2], strict=True)]
    v, i32x4 = level[0], ir.VectorType(_I32, 4)
    return b.add(b.shuffle_vector(v, v, ir.Constant(i32x4, [0, 1, 2, 3])),
                 b.shuffle_vector(v, v, ir.Constant(i32x4, [4, 5, 6, 7])))


def _avx2_body(tile: _Tile, nblk, out_ptrs: list) -> None:
    """avx2: int16 accumulators, widened (vpmaddwd) and reduced (transposed adds) every CHUNK blocks. A decode tile
    (one activation row) keeps two per pair, quarters 0 + 2 (codes c) and 1 + 3 (codes 4c: _decode "pairs", two
    instructions fewer per weight vector), widened every SPLIT_CHUNK blocks as 4 * first + second (vpmaddwd by 4 and
    by 1) into 4x the dot product, exact in int32, shifted back at the end (alone, one thread, Zen 3: 1.02-1.03x
    at K = 2048-5632; the 4-row GEMM tile, whose decode is shared by 4 rows, was 0.96x and keeps one)."""
    b = tile.b
    maddubs = _fn(b, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
    maddwd = _fn(b, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
    ones, fours = ir.Constant(_I16x16, [1] * 16), ir.Constant(_I16x16, [4] * 16)
    cols, pairs = len(tile.w_addrs), tile.pairs
    split = len(tile.x_addrs) == 1
    i32x4 = ir.VectorType(_I32, 4)
    nvec = (pairs + 3) // 4
    chunk_blocks = SPLIT_CHUNK if split else CHUNK

    def block(blk, accs):
        codes, xs = tile.block_vectors(blk, 32, "pairs" if split else "shift")
        new = list(accs)
        for q in range(4):
            for t, xt in enumerate(xs):
                for s in range(cols):
                    j = t * cols + s + (pairs * (q & 1) if split else 0)  # split: odd quarters into the second set
                    new[j] = b.add(new[j], b.call(maddubs, [codes[s][q], xt[q]]))
        return new

    def chunk(c, totals):
        end = b.add(c, _c64(chunk_blocks))
        stop = b.select(b.icmp_signed("<", end, nblk), end, nblk)
        accs = _emit_loop(b, c, stop, 1, [ir.Constant(_I16x16, None)] * (pairs * (1 + split)), block)
        if split:
            wide = [b.add(b.call(maddwd, [accs[j], fours]), b.call(maddwd, [accs[pairs + j], ones]))
                    for j in range(pairs)]
        else:
            wide = [b.call(maddwd, [a, ones]) for a in accs]
        sums = [_hsum4(b, wide[4 * v : 4 * v + 4]) for v in range(nvec)]
        return [b.add(tot, s) for tot, s in zip(totals, sums, strict=True)]

    totals = _emit_loop(b, _c64(0), nblk, chunk_blocks, [ir.Constant(i32x4, None)] * nvec, chunk)
    for j, ptr in enumerate(out_ptrs):
        total = b.extract_element(totals[j // 4], ir.Constant(_I32, j % 4))
        b.store(b.ashr(total, ir.Constant(_I32, 2)) if split else total, ptr)


def _vnni_body(tile: _Tile, nblk, out_ptrs: list, isa: str) -> None:
    """vnni / vnni512 / portable: int32 vector accumulators, `per_pair` of them per (row, weight row) pair for
    latency hiding; 'wide' steps of WIDE bytes x unroll, then single WIDE vectors, then 32-byte blocks."""
    b = tile.b
    unroll = 2 if tile.pairs < 4 else 1
    per_pair = max(1, ACCS // tile.pairs)
    masks_only = per_pair % 4 == 0  # exact: |acc| < 64 * 2 * 128 * K / 4
    totals = [ir.Constant(_I32, 0)] * tile.pairs
    start = _c64(0)
    for nbytes, u in dict.fromkeys([(WIDE, unroll), (WIDE, 1), (32, 1)]):
        step = u * nbytes // 32
        stop = b.sub(nblk, b.srem(nblk, _c64(step)))
        i32v = ir.VectorType(_I32, nbytes // 4)
        dpbusd = _fn(b, f"llvm.x86.avx512.vpdpbusd.{nbytes * 8}", i32v, [i32v] * 3)

        def body(blk0, accs, nbytes=nbytes, u=u, i32v=i32v, dpbusd=dpbusd):
            new = list(accs)
            for k in range(u):
                codes, xs = tile.block_vectors(b.add(blk0, _c64(k * nbytes // 32)), nbytes,
                                               "masks" if masks_only else "shift")
                for t, xt in enumerate(xs):
                    for s, cs in enumerate(codes):
                        for q in range(4):
                            j = (t * len(codes) + s) * per_pair + (k * 4 + q) % per_pair
                            if isa == "portable":
                                new[j] = _generic_dot(b, new[j], cs[q], xt[q])
                            else:
                                new[j] = b.call(dpbusd, [new[j], b.bitcast(cs[q], i32v), b.bitcast(xt[q], i32v)])
            return new

        accs = _emit_loop(b, start, stop, step, [ir.Constant(i32v, None)] * (tile.pairs * per_pair), body)
        reduce = _fn(b, f"llvm.vector.reduce.add.v{nbytes // 4}i32", _I32, [i32v])
        groups = 4 if masks_only else 1  # accumulator j holds quarter j % 4, scaled by 4**q
        for p in range(tile.pairs):
            for q in range(groups):
                v = accs[p * per_pair + q]
                for j in range(q + groups, per_pair, groups):
                    v = b.add(v, accs[p * per_pair + j])
                part = b.call(reduce, [v])
                totals[p] = b.add(totals[p], b.ashr(part, ir.Constant(_I32, 2 * q)) if q else part)
        start = stop
    for ptr, total in zip(out_ptrs, totals, strict=True):
        b.store(total, ptr)


def _row_addr(context, builder, typ, val):
    """(address of element 0, row stride in bytes) of an array argument; (value, None) for an integer."""
    if not isinstance(typ, types.Array):
        return val, None
    ary = cgutils.create_struct_proxy(typ)(context, builder, value=val)
    return builder.ptrtoint(ary.data, _I64), cgutils.unpack_tuple(builder, ary.strides)[0]


def _tile_intrinsic(rows: int, cols: int, emit):
    """A Numba intrinsic `dot(w, i, xq, r, nblk, out, oc)` over weight rows i.. of 2-D array w, activation rows
    r..r+rows of xq and int32 outputs out[t, oc..]: `emit(builder, w_addrs, x_addrs, w_stride, nblk, o0, o_stride)`
    writes the tile's IR, given the addresses of its `cols` weight rows and `rows` activation rows and of out[0, oc]."""

    @intrinsic
    def dot(typingctx, w, i, xq, r, nblk, out, oc):
        sig = types.void(w, types.intp, xq, types.intp, types.intp, out, types.intp)

        def codegen(context, builder, signature, args):
            (w_base, w_stride), (i_val, _), (x_base, x_stride), (r_val, _), (nblk_val, _), (o_base, o_stride), \
                (oc_val, _) = (_row_addr(context, builder, t, v) for t, v in zip(signature.args, args, strict=True))
            w0 = builder.add(w_base, builder.mul(i_val, w_stride))
            x0 = builder.add(x_base, builder.mul(r_val, x_stride))
            w_addrs = [builder.add(w0, builder.mul(w_stride, _c64(s))) for s in range(cols)]
            x_addrs = [builder.add(x0, builder.mul(x_stride, _c64(t))) for t in range(rows)]
            emit(builder, w_addrs, x_addrs, w_stride, nblk_val, builder.add(o_base, builder.mul(oc_val, _c64(4))),
                 o_stride)
            return context.get_dummy_value()

        return sig, codegen

    return dot


def make_dot(rows: int, cols: int, isa: str = ISA):
    """The `rows` x `cols` dot-product tile intrinsic for `isa` (see the module docstring)."""

    def emit(builder, w_addrs, x_addrs, w_stride, nblk, o0, o_stride) -> None:
        out_ptrs = [builder.inttoptr(builder.add(o0, builder.add(builder.mul(o_stride, _c64(j // cols)),
                                                                 _c64(4 * (j % cols)))), _I32.as_pointer())
                    for j in range(rows * cols)]
        ahead = PREFETCH_ROWS if rows == cols == 1 else cols  # decode tiles of several rows: the next tile
        tile = _Tile(builder, w_addrs, x_addrs, isa, builder.mul(w_stride, _c64(ahead)))
        if isa == "avx2":
            _avx2_body(tile, nblk, out_ptrs)
        else:
            _vnni_body(tile, nblk, out_ptrs, isa)

    return _tile_intrinsic(rows, cols, emit)


# avx2 outer-product tile: int16 lanes take one maddubs result per (16 k, output) step; 2 blocks = 64 steps stay
# within [-32768, 32512], so the int16 accumulators are widened every OUTER_CHUNK blocks.
OUTER_CHUNK = 2
OUTER_LANES = 8  # outputs per 256-bit vector (int32 lanes)


def _outer_ops(b, isa: str):
    """(madd(u8 codes, s8 x) -> int16 pair sums, widen(int16 x16) -> int32 pair sums x8): vpmaddubsw and vpmaddwd
    on avx2; target-independent IR elsewhere, so the tile compiles (and is exact) on any CPU."""
    if isa == "avx2":
        maddubs = _fn(b, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
        maddwd = _fn(b, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
        ones = ir.Constant(_I16x16, [1] * 16)
        return (lambda c, x: b.call(maddubs, [c, x])), (lambda a: b.call(maddwd, [a, ones]))
    i16x32, i32x16 = ir.VectorType(ir.IntType(16), 32), ir.VectorType(_I32, 16)

    def pairs(v, n):
        even, odd = (ir.Constant(ir.VectorType(_I32, n), list(range(o, 2 * n, 2))) for o in (0, 1))
        return b.add(b.shuffle_vector(v, v, even), b.shuffle_vector(v, v, odd))

    return (lambda c, x: pairs(b.mul(b.zext(c, i16x32), b.sext(x, i16x32)), 16)), \
        (lambda a: pairs(b.sext(a, i32x16), 8))


def make_outer_dot(rows: int, nv: int, isa: str = ISA):
    """avx2 outer-product tile `dot(wi, g, xq, r, nblk, out, oc)`: for t < rows, s < 8 * nv

        out[t, oc + s] = sum_k xq[r + t, k] * c[8 g + s, k]

    on weights in the layout of `cpu_engine.interleave_panel` (wi row g: dword d of every i2 block of weight
    rows 8g..8g+7, side by side), so that vector lanes are outputs: each 4-byte activation group is broadcast and
    `vpmaddubsw` pairs it with the codes of 8 outputs; `vpmaddwd` by ones then leaves one int32 lane per output.
    Unlike the row-dot tiles there is no horizontal reduction and the store is one vector per 8 outputs, so the
    cost per output does not grow as K shrinks (the row-dot tile spent as long reducing as multiplying at K=256)."""

    def emit(b, w_addrs, x_addrs, w_stride, nblk, o0, o_stride) -> None:
        madd, widen = _outer_ops(b, isa)
        mask = ir.Constant(_I8x32, [3] * 32)
        zero8 = ir.Constant(_I32x8, [0] * 8)

        def block(blk, accs):
            new = list(accs)
            wblk, xblk = b.mul(blk, _c64(32 * OUTER_LANES)), b.mul(blk, _c64(BLOCK))
            for d in range(8):
                wvs = [_load(b, b.add(w, b.add(wblk, _c64(32 * d))), _I8x32) for w in w_addrs]
                for q in range(4):
                    codes = [b.and_(b.lshr(wv, ir.Constant(_I8x32, [2 * q] * 32)) if q else wv, mask) for wv in wvs]
                    for t, x in enumerate(x_addrs):
                        word = _load(b, b.add(x, b.add(xblk, _c64(32 * q + 4 * d))), _I32)
                        one = b.insert_element(ir.Constant(_I32x8, None), word, ir.Constant(_I32, 0))
                        xv = b.bitcast(b.shuffle_vector(one, ir.Constant(_I32x8, None), zero8), _I8x32)  # broadcast
                        for v in range(nv):
                            new[t * nv + v] = b.add(new[t * nv + v], madd(codes[v], xv))
            return new

        def chunk(c, totals):
            stop = b.select(b.icmp_signed("<", b.add(c, _c64(OUTER_CHUNK)), nblk), b.add(c, _c64(OUTER_CHUNK)), nblk)
            accs = _emit_loop(b, c, stop, 1, [ir.Constant(_I16x16, None)] * (rows * nv), block)
            return [b.add(tot, widen(a)) for tot, a in zip(totals, accs, strict=True)]

        totals = _emit_loop(b, _c64(0), nblk, OUTER_CHUNK, [ir.Constant(_I32x8, None)] * (rows * nv), chunk)
        for t in range(rows):
            for v in range(nv):
                addr = b.add(o0, b.add(b.mul(o_stride, _c64(t)), _c64(32 * v)))
                b.store(totals[t * nv + v], b.inttoptr(addr, _I32x8.as_pointer()), align=4)

    return _tile_intrinsic(rows, nv, emit)


def make_i8_dot(cols: int, isa: str = ISA):
    """`dot(w, i, x, nvec, out)`: out[s] = sum_k x[k] * w[i + s, k] for s < cols over nvec vectors of 32 int8, both
    operands in [-127, 127] (the int8 output head). avx2: vpmaddubsw(|w|, sign(x, w)) (pairs <= 2 * 127^2, no
    saturation) widened by vpmaddwd; other ISAs: generic IR that LLVM lowers to what the target has."""

    @intrinsic
    def dot(typingctx, w, i, x, nvec, out):
        sig = types.void(w, types.intp, x, types.intp, out)

        def codegen(context, builder, signature, args):
            (w_base, w_stride), (i_val, _), (x_base, _), (n_val, _), (o_base, _) = (
                _row_addr(context, builder, t, v) for t, v in zip(signature.args, args, strict=True))
            b = builder
            w0 = b.add(w_base, b.mul(i_val, w_stride))
            rows = [b.add(w0, b.mul(w_stride, _c64(s))) for s in range(cols)]
            ones = ir.Constant(_I16x16, [1] * 16)
            i32x32 = ir.VectorType(_I32, 32)

            def step(v, accs):
                off = b.mul(v, _c64(32))
                xv = _load(b, b.add(x_base, off), _I8x32)
                new = []
                for acc, row in zip(accs, rows, strict=True):
                    wv = _load(b, b.add(row, off), _I8x32)
                    if isa == "portable":
                        p = b.mul(b.sext(wv, i32x32), b.sext(xv, i32x32))
                        for h in range(4):
                            acc = b.add(acc, b.shuffle_vector(p, p, ir.Constant(_I32x8, list(range(8 * h, 8 * h + 8)))))
                        new.append(acc)
                        continue
                    absw = b.call(_fn(b, "llvm.abs.v32i8", _I8x32, [_I8x32, ir.IntType(1)]),
                                  [wv, ir.Constant(ir.IntType(1), 0)])
                    signx = b.call(_fn(b, "llvm.x86.avx2.psign.b", _I8x32, [_I8x32, _I8x32]), [xv, wv])
                    p16 = b.call(_fn(b, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32]), [absw, signx])
                    new.append(b.add(acc, b.call(_fn(b, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16]),
                                                 [p16, ones])))
                return new

            accs = _emit_loop(b, _c64(0), n_val, 1, [ir.Constant(_I32x8, None)] * cols, step)
            sums = _hsum4(b, accs)
            for s in range(cols):
                ptr = b.inttoptr(b.add(o_base, _c64(4 * s)), _I32.as_pointer())
                b.store(b.extract_element(sums, ir.Constant(_I32, s)), ptr)
            return context.get_dummy_value()

        return sig, codegen

    return dot


@intrinsic
def fetch_add(typingctx, counter, value):
    """Atomically add `value` to counter[0] (an int64 array) and return the value before: a shared work counter,
    so the threads of a parallel region take tasks as they become free (numba's prange splits statically, and a
    thread the OS pauses on a shared machine would hold up its whole share)."""
    sig = types.int64(counter, types.int64)

    def codegen(context, builder, signature, args):
        ptr = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0]).data
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return sig, codegen


@intrinsic
def address_as(typingctx, addr, like):
    """An int64 address as a pointer to `like`'s type (a scalar such as np.float32(0)), for numba.carray over memory
    the caller keeps alive: passing `tensor.data_ptr()` costs ~0.2 us where `tensor.numpy()` and unboxing the array
    cost ~5 us per call."""
    sig = types.CPointer(like)(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def swap_num_threads(typingctx, n):
    """Set this thread's Numba thread count to n (when n > 0) and return the count before, by calling the threading
    layer's set_num_threads / get_num_threads symbols. numba.set_num_threads inside a jitted function goes through a
    ctypes pointer, which Numba cannot cache (the engine would compile again in every process, ~20 s); the symbols
    are what Numba's own parallel code calls. n must not exceed NUMBA_NUM_THREADS (the caller caps it)."""
    ensure_threads()  # registers the symbols (at typing; a cached caller registers them at cpu_engine import)
    sig = types.intp(types.intp)

    def codegen(context, builder, signature, args):
        mod, intp = builder.module, context.get_value_type(types.intp)
        get = cgutils.get_or_insert_function(mod, ir.FunctionType(intp, []), "get_num_threads")
        put = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [intp]), "set_num_threads")
        before = builder.call(get, [])
        with builder.if_then(builder.icmp_signed(">", args[0], ir.Constant(intp, 0))):
            builder.call(put, [args[0]])
        return before

    return sig, codegen


def ensure_threads() -> None:
    """Start Numba's threading layer (and register its symbols) before a cached kernel that calls swap_num_threads
    runs: a cache hit skips the intrinsic's typing. Keeps torch's thread count: the OpenMP layer's launch calls
    omp_set_num_threads(NUMBA_NUM_THREADS) in the OpenMP runtime it shares with torch, which undid an earlier
    torch.set_num_threads (or torchrun's OMP_NUM_THREADS=1 per rank) at the first kernel call."""
    import torch

    before = torch.get_num_threads()
    _launch_threads()
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
