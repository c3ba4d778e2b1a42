"""Issue 10, one test per finding: nothing loaded executes code, nothing is deleted unverified, resume is exact
or refuses, tokenizers are deterministic, files carry checksums, and bad input is one `Error:` line."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from bitnet_fast import checkpoint as ck
from bitnet_fast import plumbing
from bitnet_fast.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from bitnet_fast.cli import main
from bitnet_fast.config import TrainConfig
from bitnet_fast.plumbing import BitnetFastWarning, LockedError, folder_lock, python_module_command
from bitnet_fast.resume import ResumeError, open_run, resume_config


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def _ckpt(step: int, run_id: str | None = "run-a", **kw) -> dict:
    """A small checkpoint dict with the required keys (no model: enough for the file-level logic)."""
    return {"model": {"w": torch.full((3,), float(step))}, "model_config": {}, "train_config": {}, "tokenizer": "{}",
            "step": step, "run_id": run_id, **kw}


class _Evil:
    """Unpickling this creates the marker file: a stand-in for any code a hostile pickle runs."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------------ 1: pickles
def test_1_a_checkpoint_that_needs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    plain = tmp_path / "evil.pt"
    torch.save({**_ckpt(1), "model": _Evil(marker)}, plain)
    wrapped = tmp_path / "wrapped.pt"  # a valid envelope with a matching checksum around an evil payload
    buf = io.BytesIO()
    torch.save({**_ckpt(1), "model": _Evil(marker)}, buf)
    payload = buf.getvalue()
    import hashlib

    torch.save({"format": ck.ENVELOPE, "version": 2, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, wrapped)
    for path in (plain, wrapped):
        with pytest.raises(CheckpointError, match="could run code"):
            load_checkpoint(path)
    _one_error_line(_run("eval", plain), "could run code")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    plain.rename(out / "checkpoints" / "step-0000005.pt")
    _one_error_line(_run("train", "--model", "bitnet", "--resume", "--out", out), "none of the 1 checkpoint")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ 2: deletion
def test_2_nothing_is_deleted_unless_a_newer_checkpoint_of_the_same_run_replaces_it(tmp_path):
    out = tmp_path / "run"
    foreign = save_checkpoint(out, _ckpt(1, "run-b"), keep_last=5)
    legacy = out / "checkpoints" / "step-0000002.pt"
    torch.save(_ckpt(2, None), legacy)
    known: dict = {}
    paths = [save_checkpoint(out, _ckpt(s), keep_last=2, known=known) for s in (3, 4, 5)]
    assert [p.name for p in ck.list_checkpoints(out)] == [foreign.name, legacy.name, paths[1].name, paths[2].name]

    with pytest.raises(ResumeError, match="--resume to continue it, --overwrite"):  # a new run into a used OUT
        open_run(TrainConfig(out=str(out)))
    corrupt = ck.list_checkpoints(out)
    for p in corrupt:
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ResumeError, match="nothing was deleted"):
        open_run(TrainConfig(out=str(out), resume=True))
    assert ck.list_checkpoints(out) == corrupt  # all kept
    with pytest.warns(BitnetFastWarning, match="deleted 4"):
        open_run(TrainConfig(out=str(out), overwrite=True))
    assert ck.list_checkpoints(out) == []


def test_2_a_lock_keeps_a_second_run_out_and_a_stale_one_is_taken_over(tmp_path):
    with folder_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"), folder_lock(tmp_path):
            pass
        _one_error_line(_run("train", "--model", "fp", "--out", tmp_path), "in use by another training run")
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": plumbing.socket.gethostname()}))
    with pytest.warns(BitnetFastWarning, match="stale lock"), folder_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# ------------------------------------------------------------------------------------------------ 3: tokenizer
def test_3_bpe_training_gives_the_same_tokenizer_in_any_process(wikitext_dir, tmp_path):
    code = textwrap.dedent(f"""
        import hashlib
        from bitnet_fast.data import read_lines, train_tokenizer
        lines = read_lines([{str(wikitext_dir / "train.txt")!r}], 300)
        print(hashlib.sha256(train_tokenizer(lines, "bpe", 1000).to_str().encode()).hexdigest())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (1, 2)]
    digests = {p.communicate()[0] for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(digests) == 1, digests


def test_3_resume_uses_the_checkpoints_tokenizer(wikitext_dir):
    from tokenizers import Tokenizer

    from bitnet_fast.data import read_lines, train_tokenizer, wikitext

    other = train_tokenizer(read_lines([wikitext_dir / "valid.txt"], 40), "bpe", 200).to_str()
    corpus = wikitext(wikitext_dir, "bpe", 256, max_lines=40, tokenizer_json=other)
    assert corpus.tokenizer.get_vocab() == Tokenizer.from_str(other).get_vocab()
    assert corpus.tokenizer.get_vocab() != wikitext(wikitext_dir, "bpe", 256, max_lines=40).tokenizer.get_vocab()


# ------------------------------------------------------------------------------------------------ 4: resume
def test_4_resume_takes_the_runs_settings_and_refuses_explicit_conflicts(tmp_path):
    saved = dataclasses.asdict(TrainConfig(lr=1e-3, batch_size=8, seed=3, out="a"))
    cfg = TrainConfig(resume=True, out=str(tmp_path), max_steps=50, ckpt_every=7)
    merged, changed = resume_config(cfg, saved, explicit={"max_steps", "ckpt_every", "out", "resume"})
    assert (merged.lr, merged.batch_size, merged.seed, merged.max_steps) == (1e-3, 8, 3, 50)
    assert changed == {"max_steps": (None, 50), "ckpt_every": (200, 7)}
    kept, changed = resume_config(TrainConfig(resume=True), {**saved, "max_steps": 9}, explicit={"resume"})
    assert kept.max_steps == 9 and not changed  # not given: the run keeps its own length
    with pytest.raises(ResumeError, match=r"--seq-len 64 \(the run has 128\); --lr 0\.002 \(the run has 0\.001\)"):
        resume_config(dataclasses.replace(cfg, lr=2e-3, seq_len=64), saved, explicit={"lr", "seq_len"})
    with pytest.raises(ResumeError, match="--seed 0"):  # a library call: every field counts as explicit
        resume_config(cfg, saved)
    out = tmp_path / "run"
    save_checkpoint(out, _ckpt(4, train_config=saved), keep_last=2)
    _one_error_line(_run("train", "--model", "bitnet", "--resume", "--out", out, "--lr", "0.01"), "--lr 0.01")


# ------------------------------------------------------------------------------------------------ 5: prepare
def test_5_inputs_with_the_same_name_are_never_dropped(tmp_path):
    from bitnet_fast.data import DataError, prepare

    for d, word in (("a", "alpha"), ("b", "beta")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text(f"{word} words here\n" * 40)
    inputs = [tmp_path / "a" / "x.txt", tmp_path / "b" / "x.txt"]
    with pytest.raises(DataError, match="would both be split 'x'"):  # the library names splits after files
        prepare(inputs, tmp_path / "lib")
    result = _run("prepare", *inputs, "--out", tmp_path / "o", "--vocab-size", "40")  # the CLI pools its inputs
    assert result.exit_code == 0, result.output
    splits = json.loads((tmp_path / "o" / "manifest.json").read_text())["splits"]
    assert sum(s["words"] for s in splits.values()) == 80 * 4  # both files: 3 words + <eos> per line


# ------------------------------------------------------------------------------------------------ 6: sidecars
@pytest.mark.parametrize("sidecar", [b"", b"\xff\xfe\x00binary"], ids=["empty", "binary"])
def test_6_a_bad_sidecar_marks_that_checkpoint_bad_and_falls_back(tmp_path, sidecar):
    older = save_checkpoint(tmp_path, _ckpt(1), keep_last=5)
    newer = save_checkpoint(tmp_path, _ckpt(2), keep_last=5)
    newer.with_name(newer.name + ".sha256").write_bytes(sidecar)
    with pytest.raises(CheckpointError, match=r"step-0000002\.pt\.sha256 is empty or not a sha256 line"):
        load_checkpoint(newer)
    with pytest.warns(BitnetFastWarning, match="skipping"):
        assert latest_checkpoint(tmp_path)["step"] == load_checkpoint(older)["step"] == 1


# ------------------------------------------------------------------------------------------------ 7: checksums
def test_7_checkpoints_carry_their_checksum_and_legacy_ones_warn(tmp_path):
    path = save_checkpoint(tmp_path, _ckpt(3), keep_last=2)
    path.with_name(path.name + ".sha256").unlink()
    assert load_checkpoint(path)["step"] == 3
    blob = path.read_bytes()
    payload = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    start = blob.find(payload)
    assert start > 0
    for i in range(start, start + len(payload), max(1, len(payload) // 25)):  # flips across the payload
        flipped = bytearray(blob)
        flipped[i] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="embedded sha256"):
            load_checkpoint(path)
    legacy = tmp_path / "legacy.pt"
    torch.save(_ckpt(4), legacy)
    with pytest.warns(BitnetFastWarning, match="unverified"):
        assert load_checkpoint(legacy)["step"] == 4


def _packed(tmp_path, fmt="i2"):
    from torch import nn

    from bitnet_fast.export import save_packed
    from bitnet_fast.nn import convert

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(130, 8, bias=False))

    return make, save_packed(convert(make()), tmp_path / f"m-{fmt}.safetensors", fmt=fmt)


def _edit_tensor(path, name, edit) -> None:
    """Apply `edit(bytearray of tensor `name`)` in place in a safetensors file."""
    blob = bytearray(path.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    begin, end = json.loads(blob[8 : 8 + n])[name]["data_offsets"]
    part = bytearray(blob[8 + n + begin : 8 + n + end])
    edit(part)
    blob[8 + n + begin : 8 + n + end] = part
    path.write_bytes(bytes(blob))


def test_7_packed_exports_are_checksummed_and_validated(tmp_path):
    import struct

    from bitnet_fast.export import load_packed

    make, path = _packed(tmp_path)
    load_packed(make, path)
    _edit_tensor(path, "0.packed.data", lambda b: b.__setitem__(0, b[0] ^ 0x01))  # still valid codes
    with pytest.raises(ValueError, match="sha256"):
        load_packed(make, path)
    load_packed(make, path, verify=False)  # asked for: loads the edited weights
    _edit_tensor(path, "0.packed.data", lambda b: b.__setitem__(1, 0xFF))  # code 3 everywhere in one byte
    with pytest.raises(ValueError, match="not ternary"):
        load_packed(make, path, verify=False)
    make, path = _packed(tmp_path, "tq1")
    _edit_tensor(path, "0.packed.gamma", lambda b: b.__setitem__(slice(0, 4), struct.pack("<f", float("nan"))))
    with pytest.raises(ValueError, match="gamma is nan"):
        load_packed(make, path, verify=False)
    make, path = _packed(tmp_path / "legacy")
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    del header["__metadata__"]["sha256"]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n :])
    with pytest.warns(BitnetFastWarning, match="unverified"):
        load_packed(make, path)


# ------------------------------------------------------------------------------------------------ 8: tracebacks
def test_8_bad_inputs_are_one_error_line(tmp_path):
    from bitnet_fast.evaluate import check_eval_memory
    from bitnet_fast.model import preset_config

    if not torch.cuda.is_available():
        _one_error_line(_run("eval", tmp_path / "x.pt", "--device", "cuda"), "no CUDA")
    mcfg = preset_config("tiny", vocab_size=64).to_dict()
    save_checkpoint(tmp_path / "a", _ckpt(1, model_config=mcfg), keep_last=1)
    _one_error_line(_run("eval", tmp_path / "a" / "checkpoints" / "step-0000001.pt"), "does not match its weights")
    cache = tmp_path / "prepared"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    from bitnet_fast.data import DataError, load_prepared

    with pytest.raises(DataError, match="incomplete"):
        load_prepared(cache)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "t.txt").write_text("a a\n" * 40)
    _one_error_line(_run("prepare", tmp_path / "t.txt", "--tokenizer", tmp_path / "tok.json", "--out", tmp_path / "p"),
                    "no <eos> token")
    small = preset_config("small")
    with pytest.raises(plumbing.UserError, match="--batch-size 1000000 needs about"):
        check_eval_memory(10**9, 128, 10**6, small)  # refused before anything is allocated
    check_eval_memory(10**9, 128, 4, small)


# ------------------------------------------------------------------------------------------------ 9: report
def test_9_the_report_subprocess_ignores_the_working_directory(tmp_path):
    fake = tmp_path / "bitnet_fast"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "plumbing.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    proc = subprocess.run(python_module_command("bitnet_fast.plumbing"), cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "pwned").exists()  # the installed module ran, not ./bitnet_fast/plumbing.py


# ------------------------------------------------------------------------------------------------ 10: messages
def test_10_messages_name_the_flag_the_file_and_the_fix(tmp_path, monkeypatch):
    _one_error_line(_run("train", "--seed", str(10**23)), "--seed")
    _one_error_line(_run("train", "--lr", "inf"), "--lr", "not a finite number")
    _one_error_line(_run("calibrate", "--target-seconds", "inf"), "--target-seconds")
    _one_error_line(_run("train", "--resume", "--overwrite", "--out", tmp_path / "r"), "contradict")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    _one_error_line(_run("prepare", tmp_path / "latin1.txt", "--out", tmp_path / "o"), "latin1.txt is not UTF-8")
    _one_error_line(_run("report", tmp_path, "--out", tmp_path / "r.json", "--no-tinyllama"), "r.html")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plumbing.Path, "write_bytes", full)
    with pytest.raises(OSError, match=r"cannot write .*f\.bin: No space left"):
        plumbing.atomic_write(tmp_path / "w" / "f.bin", b"x")
    assert list((tmp_path / "w").iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(ResumeError, match="cannot write checkpoints"):
        open_run(TrainConfig(out=str(tmp_path / "ro")))
    with pytest.warns(BitnetFastWarning, match="no checkpoint .* to resume from"):
        assert open_run(TrainConfig(out=str(tmp_path / "new"), resume=True)).ckpt is None
