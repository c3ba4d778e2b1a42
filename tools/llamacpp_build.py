"""Build the llama.cpp / ggml CPU peer that our kernels are compared against.

The source is the llama.cpp tree vendored in the llama-cpp-python sdist on PyPI, pinned by version
(`LLAMA_CPP_PYTHON` in bitnet_fast/peers.py, which also finds the built llama-bench for `bitnet-fast calibrate`
and `bitnet-fast report`), so the kernel-level comparison (tools/ggml_peer.py, our tools/ggml_mulmat.c against
libggml) and the whole-model comparison (tools/bench_llamacpp.py, `llama-bench`) use one and the same ggml.
Everything lives in a cache folder (default ~/.cache/bitnet-fast/peers, or $BITNET_FAST_PEERS, or --dir),
never in the repository:

    <dir>/sdist/llama_cpp_python-<v>.tar.gz      pip download --no-binary :all: --no-deps
    <dir>/src/llama_cpp_python-<v>/               extracted sdist (vendor/llama.cpp is the llama.cpp tree)
    <dir>/build-<isa>-<v>/bin/                    libggml*.so, libllama.so, llama-bench, llama-quantize
    <dir>/build-<isa>-<v>/libggml_mulmat.so       tools/ggml_mulmat.c linked against that libggml
    <dir>/build-<isa>-<v>/peer_build.json         version, llama.cpp commit, cmake command, ggml CPU features

Two flavours, each in its own build folder: `native` (GGML_NATIVE=ON: -march=native) and `avx2` (GGML_NATIVE=OFF
with AVX/AVX2/FMA/F16C/BMI2 on and every AVX-512 / AVX-VNNI / AMX option off), so that on an AVX-512 VNNI machine
ggml can be held to the same AVX2 class as a smaller CPU. Every step is skipped when its output exists.

    python tools/llamacpp_build.py [--isa native|avx2] [--dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from bitnet_fast.peers import ISAS, LLAMA_CPP_PYTHON, build_dir, cache_dir  # one place for versions and paths

TARGETS = ["ggml", "llama-bench", "llama-quantize"]
_HERE = Path(__file__).resolve().parent
_C_SRC = _HERE / "ggml_mulmat.c"
LIB_NAME = "libggml_mulmat.so"

_COMMON = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_CPU=ON",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_BLAS=OFF",
    "-DGGML_OPENMP=ON",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
]
_OFF_X86 = ["AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_TILE", "AMX_INT8", "AMX_BF16"]
_FLAVOURS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF"]
    + [f"-DGGML_{o}=ON" for o in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")]
    + [f"-DGGML_{o}=OFF" for o in _OFF_X86],
}


def find_build(isa: str = "native", root: str | os.PathLike | None = None) -> Path | None:
    """The finished build folder of flavour `isa` (has libggml_mulmat.so, bin/llama-bench and peer_build.json), or
    None. Never builds: callers report "ggml build not found: run python tools/llamacpp_build.py" instead."""
    d = build_dir(isa, root)
    ok = all((d / p).exists() for p in (LIB_NAME, "bin/llama-bench", "bin/llama-quantize", "peer_build.json"))
    return d if ok else None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def source_dir(root: str | os.PathLike | None = None) -> Path:
    """Download (pip) and extract the pinned sdist if needed; returns the vendored llama.cpp tree."""
    root = cache_dir(root)
    src = root / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    llama = src / "vendor" / "llama.cpp"
    if (llama / "CMakeLists.txt").exists():
        return llama
    sdist_dir = root / "sdist"
    tgz = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tgz.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        # pip reads the sdist's metadata through its build backend (scikit-build-core, in an isolated env)
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(sdist_dir)])
        if not tgz.exists():
            found = sorted(p.name for p in sdist_dir.iterdir())
            raise RuntimeError(f"pip download did not produce {tgz.name} in {sdist_dir} (found: {found})")
    print(f"extracting {tgz} -> {src.parent}", flush=True)
    (root / "src").mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tf:
        kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}  # keep the sdist's .git (for the commit)
        tf.extractall(root / "src", **kw)
    if not (llama / "CMakeLists.txt").exists():
        raise RuntimeError(f"{tgz.name} has no vendor/llama.cpp/CMakeLists.txt: not a llama-cpp-python sdist?")
    return llama


def cmake_configure_cmd(llama: Path, bdir: Path, isa: str) -> list[str]:
    """The exact cmake configure command for flavour `isa`."""
    return ["cmake", "-S", str(llama), "-B", str(bdir), "-G", "Ninja", *_COMMON, *_FLAVOURS[isa]]


def _git(llama: Path, *args: str) -> str:
    try:
        r = subprocess.run(["git", "-C", str(llama), *args], capture_output=True, text=True, check=True)
        return r.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _c_compile_cmd(llama: Path, bdir: Path, isa: str) -> list[str]:
    """gcc command for our shim; no -march: it only sets ggml up, every hot loop is in the flavour's libggml-cpu."""
    bin_dir = bdir / "bin"
    return ["gcc", "-O2", "-std=c11", "-Wall", "-Wextra", "-fPIC", "-shared",
            "-I", str(llama / "ggml" / "include"), str(_C_SRC), "-o", str(bdir / LIB_NAME),
            "-L", str(bin_dir), "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{bin_dir}", "-lm"]


def _cpu_features(lib: Path) -> dict:
    """ggml's own view of the CPU features it was compiled for (from gm_info in our C library)."""
    import ctypes

    h = ctypes.CDLL(str(lib))
    h.gm_info.restype = ctypes.c_char_p
    return json.loads(h.gm_info().decode())


def build(isa: str = "native", root: str | os.PathLike | None = None, jobs: int = 2, force: bool = False) -> Path:
    """Download, configure and build flavour `isa` (ggml, llama-bench, llama-quantize, libggml_mulmat.so),
    skipping every step whose output exists unless `force`. Returns the build folder."""
    llama = source_dir(root)
    bdir = build_dir(isa, root)
    configure = cmake_configure_cmd(llama, bdir, isa)
    build_cmd = ["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]
    compile_c = _c_compile_cmd(llama, bdir, isa)
    print("cmake configure: " + shlex.join(configure))
    print("cmake build:     " + shlex.join(build_cmd))
    print("C library:       " + shlex.join(compile_c), flush=True)
    if force or not (bdir / "CMakeCache.txt").exists():
        _run(configure)
    if force or not all((bdir / "bin" / t).exists() for t in TARGETS[1:]):
        _run(build_cmd)
    lib = bdir / LIB_NAME
    if force or not lib.exists() or lib.stat().st_mtime < _C_SRC.stat().st_mtime:
        _run(compile_c)
    info_path = bdir / "peer_build.json"
    if force or not info_path.exists() or info_path.stat().st_mtime < lib.stat().st_mtime:
        ggml_cmake = (llama / "ggml" / "CMakeLists.txt").read_text()
        ver = [ln.split()[-1].rstrip(")") for ln in ggml_cmake.splitlines() if ln.startswith("set(GGML_VERSION_M")]
        ver += [ln.split()[-1].rstrip(")") for ln in ggml_cmake.splitlines() if ln.startswith("set(GGML_VERSION_P")]
        info = {
            "llama_cpp_python": LLAMA_CPP_PYTHON,
            "llama_cpp_commit": _git(llama, "rev-parse", "HEAD"),
            "llama_cpp_describe": _git(llama, "describe", "--tags", "--always"),
            "ggml_version": ".".join(ver[:3]),
            "isa": isa,
            "cmake_configure": shlex.join(configure),
            "cmake_build": shlex.join(build_cmd),
            "c_library": shlex.join(compile_c),
            "compiler": subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
            "ggml_cpu_features": _cpu_features(lib),
        }
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"built {isa}: {bdir}\n{info_path.read_text()}", flush=True)
    return bdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", choices=(*ISAS, "all"), default="native", help="build flavour (default native)")
    ap.add_argument("--dir", help="cache folder (default $BITNET_FAST_PEERS or ~/.cache/bitnet-fast/peers)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    ap.add_argument("--force", action="store_true", help="reconfigure and rebuild even if outputs exist")
    args = ap.parse_args()
    for isa in ISAS if args.isa == "all" else (args.isa,):
        build(isa, args.dir, args.jobs, args.force)


if __name__ == "__main__":
    main()
