"""Shared plumbing: the atomic writer (durable, all-or-nothing, no temp files left), cache root, machine info."""

from __future__ import annotations

import os
import re
import stat

import pytest

from bitnet_fast import plumbing
from bitnet_fast.plumbing import atomic_path, atomic_write, write_json


def test_atomic_write_replaces_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "sub" / "f.json"
    assert atomic_write(path, "old") == path  # creates the folder
    write_json(path, {"a": [1, 2]})
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ]\n}'
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk on fire")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(plumbing.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with pytest.raises(TypeError):  # not serializable: fails before anything touches the disk
        write_json(tmp_path / "g.json", {"x": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(plumbing.os, "fsync", spy)
    atomic_write(tmp_path / "f", "x")
    assert synced == [False, True]  # the file's data, then the folder's entry (the rename)


def test_new_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_cache_root_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path))
    assert plumbing.cache_root() == tmp_path
    monkeypatch.delenv("BITNET_FAST_CACHE")
    assert plumbing.cache_root().name == "bitnet-fast"


def test_machine_info_names_cpu_and_isa():
    m = plumbing.machine_info()
    assert m["cpu"] and m["logical_cpus"] >= 1 and m["memory_total_bytes"] > 0
    line = plumbing.describe_machine(m)
    assert m["cpu"] in line and (m["isa"] or "ISA not recorded") in line
    assert plumbing.peak_rss_bytes() > 10 * 2**20  # bytes, not KiB


def test_fmt():
    assert plumbing.fmt(None) == "—" and plumbing.fmt(1536, "B") == "1.50 KiB" and plumbing.fmt(12345) == "12.3k"


@pytest.mark.parametrize("fails", ["checkpoint", "sidecar"])
def test_a_checkpoint_write_that_fails_midway_keeps_the_previous_one(tmp_path, monkeypatch, fails):
    """save_checkpoint under a disk that fills up halfway through the new file (or its sidecar): the error names
    the file, the previous checkpoint is untouched and still the one training resumes from, and no partial file
    (temporary or final) is left where a reader could take it for a checkpoint."""
    import errno
    from pathlib import Path

    import torch

    from bitnet_fast.checkpoint import latest_checkpoint, save_checkpoint

    def ckpt(step: int) -> dict:
        return {"model": {"w": torch.full((4096,), float(step))}, "model_config": {}, "train_config": {},
                "tokenizer": "{}", "step": step, "run_id": "r"}

    save_checkpoint(tmp_path, ckpt(1), keep_last=2)
    folder = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_write = Path.write_bytes
    target = "step-0000002.pt" + (".sha256" if fails == "sidecar" else "")

    def disk_full_halfway(self, data):  # the target file, or a temp file for it (atomic_path's naming)
        if self.name == target or re.fullmatch(rf"\.{re.escape(target)}\.\d+\.[0-9a-f]+\.tmp", self.name):
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_halfway)
    with pytest.raises(OSError, match=f"cannot write .*{target}: No space left"):
        save_checkpoint(tmp_path, ckpt(2), keep_last=2)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in ("step-0000002.pt",)}
    assert after == before  # the old checkpoint and sidecar byte for byte, no temp file
    if fails == "checkpoint":
        assert not (folder / "step-0000002.pt").exists()
        assert latest_checkpoint(tmp_path)["step"] == 1
    else:  # the checkpoint itself was complete; it verifies by its embedded checksum without the sidecar
        assert latest_checkpoint(tmp_path)["step"] == 2


def test_resaving_a_step_whose_sidecar_write_fails_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Writing the same step again (new bytes) when the sidecar write fails must not leave the old sidecar
    beside the new file, vouching for bytes that are gone: the step still loads (by its embedded checksum)."""
    import errno
    from pathlib import Path

    import torch

    from bitnet_fast.checkpoint import load_checkpoint, save_checkpoint

    def ckpt(value: float) -> dict:
        return {"model": {"w": torch.full((64,), value)}, "model_config": {}, "train_config": {},
                "tokenizer": "{}", "step": 5, "run_id": "r"}

    path = save_checkpoint(tmp_path, ckpt(1.0), keep_last=2)
    real_write = Path.write_bytes

    def sidecar_disk_full(self, data):
        if ".sha256" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", sidecar_disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, ckpt(2.0), keep_last=2)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64,), 2.0))
