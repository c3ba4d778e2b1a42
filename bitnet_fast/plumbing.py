"""Shared plumbing of the application layer, one place for each: atomic file writes, the run folder's lock, the
cache root, warnings, the child-Python command, peak memory, the machine and commit a measurement ran on, and
human-readable numbers.

Every file the project writes (checkpoints, shards, manifests, reports, the kernel tuning file, cached
measurements, packed models) goes through `atomic_path` / `atomic_write`: after a crash the target holds either
its old or its new content, never a torn mix, and no temp file is left behind by a failed write. The one
exception is the append-only `metrics.jsonl` log, whose reader skips a torn last line.

`bitnet_fast.kernels` does not use this module: the kernels layer imports nothing from the rest of the package.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import secrets
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(Exception):
    """An error the user can fix (missing data, corrupt file, a run that cannot go on); the message says how.
    The CLI prints it as one `Error: ...` line without a traceback."""


class BitnetFastWarning(UserWarning):
    """Something the user should know that does not stop the work (an unverified legacy file, a stale lock taken
    over). Issued with `warn`; Python prints warnings on stderr, the CLI as one `warning: ...` line."""


def warn(message: str) -> None:
    """Issue a BitnetFastWarning (stderr, never stdout)."""
    warnings.warn(message, BitnetFastWarning, stacklevel=2)


# ------------------------------------------------------------------------------------------------ writing files
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path beside `path` for the caller to write; then fsync it, rename it over `path` and fsync
    the folder so the rename itself is durable. If the body raises, the temp file is removed and `path` is
    untouched. The temp file is created with the usual permissions (umask applies), like a plain open()."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise _naming(e, path) from None
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically and durably (see `atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _naming(e: OSError, path: Path) -> OSError:
    """`e` with a message that names the file being written (a bare "[Errno 28] No space left" does not)."""
    if e.errno is None or str(path) in str(e):
        return e
    return type(e)(e.errno, f"cannot write {path}: {e.strerror}")


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1, **kw: Any) -> Path:
    """`obj` as JSON (`json.dumps` options in kw), written atomically; returns the path."""
    return atomic_write(path, json.dumps(obj, indent=indent, **kw))


# ------------------------------------------------------------------------------------------------ run lock
class LockedError(UserError):
    """Another live process holds the folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold `folder/.lock` (JSON: pid, host) while the body runs, so that two processes never write one run folder.

    The lock file appears complete or not at all (written under a name of its own, then hard-linked into place,
    which fails if it exists). A lock whose process is gone (same host, pid not alive: a run killed with kill -9,
    a torchrun restart) or that is unreadable is stale: it is taken over with a warning. A live holder, or one on
    another host (whose pid cannot be checked), is a LockedError naming it and the file to delete if wrong."""
    folder = Path(folder)
    lock = folder / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            mine = folder / f".lock.{me['pid']}.{secrets.token_hex(4)}"
            mine.write_text(json.dumps(me))
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                pass
            finally:
                mine.unlink(missing_ok=True)
            try:
                holder = json.loads(lock.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError, KeyError, TypeError):
                warn(f"{lock} is unreadable; taking it over")
                lock.unlink(missing_ok=True)
                continue
            if host != me["host"]:
                raise LockedError(f"{folder} is locked by pid {pid} on host {host}; if no {what} is using it, "
                                  f"delete {lock}")
            if _alive(pid):
                raise LockedError(f"{folder} is in use by another {what} (pid {pid}); wait for it or use another "
                                  f"folder (delete {lock} if that process is not a bitnet-fast {what})")
            warn(f"taking over the stale lock of pid {pid} (no longer running) in {folder}")
            lock.unlink(missing_ok=True)
        else:
            raise LockedError(f"could not take the lock {lock}; another {what} is starting there")
    except OSError as e:
        raise UserError(f"cannot lock {folder}: {e.strerror or e} (is it writable?)") from None
    try:
        yield lock
    finally:
        try:
            if json.loads(lock.read_text()) == me:
                lock.unlink()
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------------------------------ child Pythons
def python_module_command(module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args` with the current directory off sys.path, so that a
    `./bitnet_fast/...` in the working directory is never imported instead of the installed package (what
    `python -P` does on Python >= 3.11, done by hand so that 3.10 is covered and PYTHONPATH still applies)."""
    boot = f"import runpy, sys; sys.path.pop(0); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", boot, *args]


# ------------------------------------------------------------------------------------------------ places
def cache_root() -> Path:
    """Where bitnet-fast caches things (tokenized corpora, the default data dir): $BITNET_FAST_CACHE, else the
    per-user cache dir (~/.cache/bitnet-fast on Linux). The kernel tuning file has its own variable,
    $BITNET_FAST_TUNING (kernels.tuning.path())."""
    env = os.environ.get("BITNET_FAST_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("bitnet-fast"))


# ------------------------------------------------------------------------------------------------ measuring
def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def cpu_name() -> str:
    """The CPU model as the OS names it (e.g. "AMD EPYC 9R14"), else the processor or architecture name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine a measurement ran on: CPU model and the kernels' view of it (`isa`: the dot-product ISA class
    of the CPU kernels, `isa_forced` when BITNET_FAST_CPU_ISA chose it; `int_mm_vnni`: whether torch._int_mm
    reaches a VNNI GEMM), cores, threads, memory, load and library versions."""
    import numba
    import psutil
    import torch

    try:
        from .kernels import tuning

        caps = tuning.capabilities()
    except ImportError:  # no numba backend on this platform
        caps = {"isa": None, "int_mm_vnni": None}
    vm = psutil.virtual_memory()
    return {
        "cpu": cpu_name(), "arch": platform.machine(), **caps,
        "isa_forced": bool(os.environ.get("BITNET_FAST_CPU_ISA")), "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "memory_total_bytes": vm.total, "memory_available_bytes": vm.available, "python": platform.python_version(),
        "torch": torch.__version__, "numba": numba.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def git_commit() -> str | None:
    """The commit of the bitnet-fast checkout that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_machine(m: dict[str, Any]) -> str:
    """One line naming the machine of `machine_info()`: CPU model, ISA, threads (what every measured table states)."""
    isa = f"{m['isa']}{' (forced)' if m.get('isa_forced') else ''}" if m.get("isa") else "ISA not recorded"
    return f"{m.get('cpu', '?')} ({m.get('arch', '?')}, {isa}), {m.get('torch_threads', '?')} torch threads"


# ------------------------------------------------------------------------------------------------ numbers
def fmt(v: float | None, unit: str = "") -> str:
    """Compact human number: 1.23k, 45.6M, 0.0123; bytes with unit='B' as KiB/MiB/GiB; None as a dash."""
    if v is None:
        return "—"
    if unit == "B":
        for u, d in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(v) >= d:
                return f"{v / d:.2f} {u}"
        return f"{v:.0f} B"
    a = abs(v)
    s = (f"{v / 1e9:.3g}G" if a >= 1e9 else f"{v / 1e6:.3g}M" if a >= 1e6 else f"{v / 1e3:.3g}k" if a >= 1e4
         else f"{v:.4g}")
    return f"{s} {unit}".strip()
