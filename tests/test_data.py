"""Data pipeline: locating WikiText-2, tokenizers, checksummed shards, deterministic sharded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitnet_fast import data
from bitnet_fast.data import (
    Batches,
    DataError,
    count_words,
    encode_lines,
    eval_windows,
    find_wikitext,
    prepare,
    read_shard,
    train_tokenizer,
    write_shard,
)

TEXT = ["= Valkyria Chronicles =", "", "the game began development in 2010 , carrying over a large portion",
        "of the work done on <unk> Chronicles II .", "it met with positive sales in Japan"] * 20


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# ------------------------------------------------------------------------------------------------ locating
def _fake_wikitext(folder):
    folder.mkdir(parents=True)
    for name in ("train.txt", "valid.txt"):
        (folder / name).write_text("a b c\n")
    return folder


def test_find_wikitext_accepts_the_folder_or_its_parent(tmp_path, monkeypatch):
    inner = _fake_wikitext(tmp_path / "wikitext-2")
    assert find_wikitext(inner) == inner
    assert find_wikitext(tmp_path) == inner
    monkeypatch.setenv("BITNET_FAST_DATA", str(tmp_path))
    assert find_wikitext() == inner


def test_default_data_dir_is_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.delenv("BITNET_FAST_DATA", raising=False)
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path))
    inner = _fake_wikitext(tmp_path / "data" / "wikitext-2")
    assert find_wikitext() == inner


def test_missing_data_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BITNET_FAST_DATA", raising=False)
    with pytest.raises(DataError, match=r"--data-dir.*WikiText-2 not found|WikiText-2 not found.*--data-dir"):
        find_wikitext(tmp_path / "nope")
    monkeypatch.setenv("BITNET_FAST_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"\$BITNET_FAST_DATA.*train\.txt"):
        find_wikitext()


def test_other_text_is_rejected_saying_how_it_differs(tmp_path):
    folder = _fake_wikitext(tmp_path / "wikitext-2")
    with pytest.raises(DataError, match=r"not the WikiText-2 v1 train split: it has 1 lines and 4 words"):
        data.wikitext_split(folder, "train")
    (folder / "test.txt").write_text("x y\n")  # the test split is checked too (its exact sha256)
    with pytest.raises(DataError, match=r"test split: it has 1 lines"):
        data.wikitext_split(folder, "test")
    with pytest.raises(DataError, match="not found"):
        data.wikitext_split(tmp_path, "test")


def test_real_wikitext_checksums_and_word_counts(wikitext_dir):
    lines = data.read_lines([data.wikitext_split(wikitext_dir, "valid")])
    assert count_words(lines) == 217_646  # WikiText-2 valid: words + one <eos> per line


# ------------------------------------------------------------------------------------------------ tokenizers
@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_tokenizer_round_trip_and_eos_per_line(kind):
    tok = train_tokenizer(TEXT, kind, vocab_size=300)
    ids = encode_lines(tok, TEXT[:3])
    eos = tok.token_to_id(data.EOS)
    assert ids[0] == eos and (ids == eos).sum() == 4  # leading <eos> + one per line
    assert tok.decode(encode_lines(tok, TEXT[2:3], leading_eos=False).tolist()) == TEXT[2]
    assert tok.token_to_id(data.UNK) is not None and tok.encode("<unk>", add_special_tokens=False).ids == [
        tok.token_to_id(data.UNK)
    ]


def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(TEXT, "chars")


# ------------------------------------------------------------------------------------------------ shards
@pytest.mark.parametrize("high", [2**16 - 1, 2**20])
def test_shard_round_trip_picks_dtype(tmp_path, high):
    tokens = np.random.default_rng(0).integers(0, high, size=1001)
    write_shard(tmp_path / "s.bin", tokens)
    got = read_shard(tmp_path / "s.bin")
    assert got.dtype.itemsize == (2 if high < 2**16 else 4)
    np.testing.assert_array_equal(got, tokens)
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_truncated_and_foreign_shards_are_detected(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(500))
    raw = bytearray(path.read_bytes())
    cases = {
        "checksum": raw[:-1] + bytes([raw[-1] ^ 1]),
        "truncated": raw[:-2],
        "not a bitnet-fast": b"XXXXXXXX" + raw[8:],
        "no complete header": raw[:20],
    }
    for msg, blob in cases.items():
        path.write_bytes(bytes(blob))
        with pytest.raises(DataError, match=msg):
            read_shard(path)


def test_prepare_any_corpus(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(TEXT) + "\n")
    manifest = prepare([src], tmp_path / "out", kind="bpe", vocab_size=200, shard_tokens=100)
    split = manifest["splits"]["corpus"]
    assert split["words"] == count_words(TEXT) and len(split["files"]) == -(-split["tokens"] // 100)
    corpus = data.load_prepared(tmp_path / "out")
    assert len(corpus.splits["corpus"].tokens) == split["tokens"] and corpus.vocab_size <= 200
    with pytest.raises(DataError, match="not found"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out2")


def test_wikitext_slice_is_cached(wikitext_dir):
    a = data.wikitext(wikitext_dir, vocab_size=256, max_lines=50)
    b = data.wikitext(wikitext_dir, vocab_size=256, max_lines=50)
    assert a.dir == b.dir and a.vocab_size == 256
    np.testing.assert_array_equal(a.splits["train"].tokens, b.splits["train"].tokens)


@pytest.mark.parametrize("damage", ["shard bit flip", "truncated shard", "broken manifest"])
def test_a_corrupt_token_cache_is_rebuilt(wikitext_dir, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path))
    a = data.wikitext(wikitext_dir, vocab_size=256, max_lines=50)
    want = {name: np.array(split.tokens) for name, split in a.splits.items()}
    shard = sorted(a.dir.glob("train-*.bin"))[0]
    raw = shard.read_bytes()
    if damage == "shard bit flip":
        shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "truncated shard":
        shard.write_bytes(raw[:-2])
    else:
        (a.dir / "manifest.json").write_text('{"splits": ')
    with pytest.raises(DataError):
        data.load_prepared(a.dir)  # the cache really is damaged
    b = data.wikitext(wikitext_dir, vocab_size=256, max_lines=50)
    assert b.dir == a.dir
    for name, tokens in want.items():
        np.testing.assert_array_equal(b.splits[name].tokens, tokens)
    again = data.load_prepared(a.dir)  # rebuilt on disk, not just in memory
    np.testing.assert_array_equal(again.splits["train"].tokens, want["train"])


# ------------------------------------------------------------------------------------------------ batches
def test_batches_are_deterministic_and_shift_by_one():
    tokens = np.arange(1000)
    a, b = Batches(tokens, 4, 10, seed=1), Batches(tokens, 4, 10, seed=1)
    for (x1, y1), (x2, y2) in zip(a.epoch(0), b.epoch(0), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == (4, 10) and torch.equal(y1, x1 + 1)
    first = [x for x, _ in a.epoch(0)]
    assert not torch.equal(first[0], next(Batches(tokens, 4, 10, seed=2).epoch(0))[0])
    assert not torch.equal(first[0], next(a.epoch(1))[0])
    assert all(torch.equal(x, first[3 + i]) for i, (x, _) in enumerate(a.epoch(0, start=3)))


def test_batches_rank_sharding_is_disjoint():
    tokens = np.arange(10 * 8 * 3 + 1)
    seen = []
    for rank in range(3):
        b = Batches(tokens, 2, 8, seed=0, rank=rank, world_size=3)
        seen += [int(x[i, 0]) for x, _ in b.epoch(0) for i in range(2)]
        assert len(b) == 5  # 30 windows of 8 -> 10 per rank -> 5 batches of 2
    assert len(seen) == len(set(seen)) == 30
    with pytest.raises(ValueError, match="rank"):
        Batches(tokens, 2, 8, rank=3, world_size=3)
    with pytest.raises(ValueError, match="batch-size"):
        Batches(np.arange(10), 4, 8)


def test_eval_windows_predict_every_token_once():
    tokens = np.arange(53)
    targets = torch.cat([y.flatten() for _, y in eval_windows(tokens, 8, 3)])
    assert torch.equal(targets, torch.arange(1, 53))


def test_sharded_eval_adds_up_to_the_whole():
    """The ranks of a distributed run each evaluate every world-th batch: their NLL sums and token counts add up
    to the single-process perplexity (7 batches over 3 ranks: uneven shares, one rank with the short tail)."""
    from bitnet_fast.evaluate import nll_sum, perplexity, ppl_from
    from bitnet_fast.model import LM, ModelConfig

    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, hidden=32, max_seq_len=8))
    split = data.Split(tokens=np.random.default_rng(0).integers(0, 50, 8 * 3 * 6 + 5), words=120)
    whole = perplexity(model, split, 8, 3)
    parts = [nll_sum(model, split, 8, 3, shard=(r, 3)) for r in range(3)]
    assert sum(n for _, n in parts) == whole["tokens"] == len(split.tokens) - 1
    assert all(n > 0 for _, n in parts)
    merged = ppl_from(sum(x for x, _ in parts), sum(n for _, n in parts), split.words)
    assert merged["ppl"] == pytest.approx(whole["ppl"], rel=1e-12)
    assert merged["word_ppl"] == pytest.approx(whole["word_ppl"], rel=1e-12)
