"""Any corpus end to end: `prepare` (train/valid split) -> `train --data` -> `eval` -> `generate` streaming text."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

from bitnet_fast.cli import main
from bitnet_fast.corpus import prepare_split
from bitnet_fast.data import UNK, DataError, load_prepared
from bitnet_fast.generate import Generator, Stats


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _corpus(path, n_lines: int = 400, seed: int = 0):
    """Generated sentences from a small grammar, one per line, some blank lines."""
    rng = random.Random(seed)
    nouns, verbs = ["cat", "dog", "bird", "lobster", "ship"], ["sees", "eats", "follows", "finds"]
    lines = [" ".join(["the", rng.choice(nouns), rng.choice(verbs), "the", rng.choice(nouns), "."])
             if i % 7 else "" for i in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BitNet tiny model trained 2 steps with `train --data` on a prepared generated corpus."""
    root = tmp_path_factory.mktemp("corpus")
    _corpus(root / "text.txt")
    r = _run("prepare", root / "text.txt", "--out", root / "prep", "--kind", "word", "--vocab-size", "64",
             "--valid-fraction", "0.1")
    assert r.exit_code == 0 and "train: " in r.output and "valid: " in r.output, r.output
    r = _run("train", "--data", root / "prep", "--preset", "tiny", "--model", "bitnet", "--max-steps", "2",
             "--batch-size", "4", "--seq-len", "16", "--no-progress", "--out", root / "run")
    assert r.exit_code == 0, r.output
    return root, sorted((root / "run" / "checkpoints").glob("*.pt"))[-1]


def test_prepare_holds_out_the_end_or_takes_valid_files(tmp_path):
    lines = _corpus(tmp_path / "a.txt", 100)
    m = prepare_split([tmp_path / "a.txt"], tmp_path / "p", valid_fraction=0.1, kind="word", vocab_size=64)
    assert m["splits"]["valid"]["words"] == sum(len(ln.split()) + 1 for ln in lines[-10:])
    assert m["splits"]["train"]["words"] == sum(len(ln.split()) + 1 for ln in lines[:-10])
    (tmp_path / "v.txt").write_text("the zebra sees the cat .\n")  # "zebra" is not in train: the tokenizer lacks it
    prepare_split([tmp_path / "a.txt"], tmp_path / "q", valid=[tmp_path / "v.txt"], kind="word", vocab_size=64)
    corpus = load_prepared(tmp_path / "q")
    assert corpus.tokenizer.token_to_id("zebra") is None
    assert corpus.tokenizer.token_to_id(UNK) in corpus.splits["valid"].tokens.tolist()
    (tmp_path / "one.txt").write_text("just one line\n")
    with pytest.raises(DataError, match="too few"):
        prepare_split([tmp_path / "one.txt"], tmp_path / "r")


def test_train_eval_report_on_a_prepared_corpus(trained, tmp_path):
    root, ckpt = trained
    report = json.loads((root / "run" / "report.json").read_text())
    assert report["steps"] == 2 and report["data"] == str(root / "prep") and report["final_valid_ppl"] > 1
    r = _run("eval", ckpt, "--json")  # the checkpoint's own --data folder by default
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["data"] == str(root / "prep") and result["words"] == report["tokenizer"]["valid_words"]
    _corpus(tmp_path / "other.txt", 100, seed=1)
    assert _run("prepare", tmp_path / "other.txt", "--out", tmp_path / "other", "--kind", "bpe",
                "--vocab-size", "40").exit_code == 0
    r = _run("eval", ckpt, "--data", tmp_path / "other")
    assert r.exit_code == 1 and "another tokenizer" in r.output and "Traceback" not in r.output
    r = _run("train", "--data", root / "prep", "--data-dir", root, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--data-dir" in r.output and "exclude each other" in r.output
    r = _run("train", "--data", tmp_path, "--preset", "tiny", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "no manifest.json" in r.output
    r = _run("report", root / "run", "--no-tinyllama", "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output


def test_generate_streams_text_and_tokens_per_second(trained):
    _, ckpt = trained
    r = _run("generate", ckpt, "--prompt", "the cat sees a zebra", "--max-new-tokens", "12", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert "became <unk>: a, zebra" in r.output and r.output.count("warning") == 1
    assert r.output.splitlines()[1].startswith("the cat sees a zebra ")  # the prompt, then the continuation
    assert "[decoder] prompt 6 tokens at" in r.output and "decode 11 tokens at" in r.output
    r = _run("generate", ckpt, "--prompt", "the dog", "--max-new-tokens", "300")  # beyond the context (tiny: 128)
    assert r.exit_code == 0 and "[torch]" in r.output and "decode 299 tokens" in r.output, r.output
    for bad, msg in (([" "], "--prompt is empty"), (["x", "--temperature", "-1"], "--temperature")):
        r = _run("generate", ckpt, "--prompt", *bad)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    r = _run("generate", ckpt.with_name("missing.pt"), "--prompt", "the")
    assert r.exit_code == 1 and r.output.startswith("Error: cannot read checkpoint")


def test_streamed_text_is_the_decoded_greedy_continuation(trained):
    _, ckpt = trained
    gen = Generator(ckpt)
    *pieces, stats = gen.stream("the bird\nthe cat", 20, temperature=0, engine="torch")
    assert isinstance(stats, Stats) and stats.engine == "torch" and stats.new_tokens == 20
    ids, unknown = gen.encode("the bird\nthe cat")
    assert unknown == [] and ids[0] == ids[3] == gen.eos  # a leading <eos>, and one per line break
    want = gen.model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
    text = gen.decode(want)
    assert "".join(pieces) == (text if text.startswith("\n") else " " + text)


def test_a_decoder_file_generates_what_its_checkpoint_does(trained, tmp_path):
    """`export --format decoder` writes the packed decoder with the tokenizer; `generate FILE` maps it and continues
    the prompt token for token as the checkpoint's decoder engine does (greedy)."""
    _, ckpt = trained
    out = tmp_path / "m.decoder"
    r = _run("export", ckpt, out, "--format", "decoder")
    assert r.exit_code == 0 and out.is_file(), r.output
    args = ("--prompt", "the cat sees", "--max-new-tokens", "20", "--temperature", "0")
    want, got = _run("generate", ckpt, *args, "--engine", "decoder"), _run("generate", out, *args)
    assert want.exit_code == 0 and got.exit_code == 0, got.output
    text = [[ln for ln in r.output.splitlines() if not ln.startswith("[decoder]")] for r in (want, got)]
    assert text[0] == text[1] and len(" ".join(text[0]).split()) > 3  # the text; the stats lines' times differ
    assert "[decoder] prompt 4 tokens" in got.output
    for extra, msg in ((("--engine", "torch"), "needs a training checkpoint"),
                       (("--max-new-tokens", "300"), "exceed the context of 128 tokens")):
        r = _run("generate", out, "--prompt", "the dog", *extra)
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    cut = tmp_path / "cut.decoder"  # a download cut short: named as a damaged decoder file, not as a checkpoint
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    r = _run("generate", cut, "--prompt", "the dog")
    assert r.exit_code == 1 and "corrupt or truncated" in r.output and "Traceback" not in r.output, r.output
