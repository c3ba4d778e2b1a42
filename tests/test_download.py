"""WikiText-2 fetched from a Hugging Face hub stand-in on 127.0.0.1 (tests/hub_server.py) and recognized by content:
the whole path through huggingface_hub, a dropped connection, a short body, a corrupt body, a server error, a file
that is not WikiText-2, offline mode, and `bitnet-fast train` on a machine without data."""

from __future__ import annotations

import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hub_server import Hub, serve

from bitnet_fast import wikitext
from bitnet_fast.cli import main
from bitnet_fast.data import DataError, wikitext_split
from bitnet_fast.download import fetch_wikitext, find_or_fetch

VALID = wikitext.HF_FILES["valid"]
SMALL = " \n = Homarus gammarus = \n \n Homarus gammarus is a species of lobster . \n \n It may grow to 60 cm . \n"


def _parquet(text: str) -> bytes:
    """The hub's layout of a wiki.*.tokens text: one row per line, blank lines (" \\n") as empty strings."""
    rows = ["" if line == wikitext.BLANK_LINE else line for line in text.splitlines(keepends=True)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), buf)
    return buf.getvalue()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No data anywhere: fresh bitnet-fast and Hugging Face caches, no BITNET_FAST_DATA, online."""
    for var in ("BITNET_FAST_DATA", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return tmp_path


@pytest.fixture
def small(monkeypatch, env):
    """A hub serving SMALL as the valid split, and the fingerprint table taught that SMALL is the valid split."""
    monkeypatch.setitem(wikitext.KNOWN, "valid", wikitext.fingerprint(SMALL.encode()))
    with serve(Hub(wikitext.HF_REPO, {VALID: _parquet(SMALL)})) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def _no_leftovers(env) -> None:
    """Nothing half-written: no valid.txt, no temp file, no blob in the Hugging Face cache."""
    assert not [p for p in (env / "dest").rglob("*") if p.is_file()]
    assert not [p for p in (env / "hf").rglob("*") if p.is_file() and ("blobs" in p.parts or "incomplete" in p.name)]


# ------------------------------------------------------------------------------------------------ the hub's layout
def test_rows_become_the_original_lines():
    assert wikitext.rows_to_text(["", " = A = \n", "", " b c \n"]) == " \n = A = \n \n b c \n"
    with pytest.raises(ValueError, match=r"row 1 .* no trailing newline"):
        wikitext.rows_to_text(["", " = A ="])


# ------------------------------------------------------------------------------------------------ transfers
def test_fetch_writes_the_checked_split_once(small, env):
    assert fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None) == env / "dest"
    assert (env / "dest" / "valid.txt").read_text() == SMALL
    assert [m for m, _, _ in small.log] == ["HEAD", "GET"]
    messages = []
    fetch_wikitext(env / "dest", ["valid"], echo=messages.append)  # already there and correct: no request
    assert len(small.log) == 2 and "already there" in messages[0]


def test_a_dropped_connection_resumes_with_a_range_request(small, env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)  # (10 MiB) so that the half body arrives in chunks
    small.faults[VALID] = "drop_once"
    fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)
    assert (env / "dest" / "valid.txt").read_text() == SMALL
    gets = [rng for m, _, rng in small.log if m == "GET"]
    assert gets[0] is None and re.fullmatch(r"bytes=\d+-", gets[-1]) and int(gets[-1][6:-1]) > 0


def test_a_short_download_fails_leaves_nothing_and_the_next_run_succeeds(small, env):
    small.faults[VALID] = "short"
    with pytest.raises(DataError, match=r"downloading http://127\.0\.0\.1:\d+/datasets/.*failed: .*size"):
        fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)
    _no_leftovers(env)
    del small.faults[VALID]
    fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)
    assert (env / "dest" / "valid.txt").read_text() == SMALL


def test_a_corrupt_download_is_caught_by_its_checksum_and_removed(small, env):
    small.faults[VALID] = "corrupt"
    with pytest.raises(DataError, match=r"arrived corrupt .*sha256.*run again"):
        fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)
    _no_leftovers(env)
    del small.faults[VALID]
    fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)  # downloaded afresh, not served from the cache
    assert (env / "dest" / "valid.txt").read_text() == SMALL and sum(m == "GET" for m, _, _ in small.log) == 2


def test_a_server_error_is_one_clear_error(small, env):
    small.faults[VALID] = "error"
    with pytest.raises(DataError, match=r"failed: .*500.*Check the connection"):
        fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)
    _no_leftovers(env)


def test_a_file_that_is_not_wikitext_is_rejected(small, env):
    small.files[VALID] = _parquet(SMALL.replace("lobster", "crab"))
    with pytest.raises(DataError, match=r"is not WikiText-2 v1 valid: .*lines differ"):
        fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)
    _no_leftovers(env)  # removed from the Hugging Face cache too: a fixed mirror is asked again
    small.files[VALID] = b"PAR1 but not parquet"
    with pytest.raises(DataError, match=r"not WikiText-2 v1 valid: not a readable parquet file"):
        fetch_wikitext(env / "dest", ["valid"], echo=lambda m: None)
    _no_leftovers(env)


def test_offline_keeps_the_not_found_error_and_never_connects(small, env, monkeypatch):
    with pytest.raises(DataError, match=r"WikiText-2 not found.*offline"):
        find_or_fetch(offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"WikiText-2 not found.*offline"):
        find_or_fetch()
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE"):
        fetch_wikitext(env / "dest", ["valid"])
    assert small.log == [] and small.other == []


def test_a_named_folder_is_never_replaced_by_a_download(small, env, monkeypatch):
    with pytest.raises(DataError, match=r"WikiText-2 not found.*--data-dir"):
        find_or_fetch(env / "mine")
    monkeypatch.setenv("BITNET_FAST_DATA", str(env / "mine"))
    with pytest.raises(DataError, match=r"\$BITNET_FAST_DATA"):
        find_or_fetch()
    assert small.log == [] and small.other == []


# ------------------------------------------------------------------------------------------------ the real thing
def _reordered(text: str) -> str:
    """The articles of a WikiText split in reverse order (an article starts at a " = Title = " line)."""
    articles: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return "".join(line for article in reversed(articles) for line in article)


def test_any_article_order_passes_and_any_other_change_fails(wikitext_dir, tmp_path):
    train = (wikitext_dir / "train.txt").read_text(encoding="utf-8")
    other = _reordered(train)
    assert other != train and sorted(other.splitlines()) == sorted(train.splitlines())
    (tmp_path / "train.txt").write_text(other, encoding="utf-8")
    assert wikitext_split(tmp_path, "train") == tmp_path / "train.txt"
    (tmp_path / "train.txt").write_text(other.replace(" the ", " teh ", 1), encoding="utf-8")
    with pytest.raises(DataError, match=r"not the WikiText-2 v1 train split: .*counts match but its lines differ"):
        wikitext_split(tmp_path, "train")
    (tmp_path / "train.txt").write_text(other.split("\n", 1)[1], encoding="utf-8")
    with pytest.raises(DataError, match=r"36,717 lines .* has 36,718"):
        wikitext_split(tmp_path, "train")
    (tmp_path / "test.txt").write_text(" \n = A = \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test split: it has 2 lines .* has 4,358"):
        wikitext_split(tmp_path, "test")


def test_train_on_a_machine_without_data_fetches_from_the_hub(wikitext_dir, env, monkeypatch):
    """The README's quick start without ../shared: train finds nothing, downloads (an official-like article order
    that differs from ../shared's), checks and trains."""
    train = _reordered((wikitext_dir / "train.txt").read_text(encoding="utf-8"))
    valid = (wikitext_dir / "valid.txt").read_text(encoding="utf-8")
    files = {wikitext.HF_FILES["train"]: _parquet(train), VALID: _parquet(valid)}
    with serve(Hub(wikitext.HF_REPO, files)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--model", "fp", "--max-steps", "2",
                                           "--batch-size", "4", "--seq-len", "16", "--max-lines", "40",
                                           "--vocab-size", "128", "--no-progress", "--out", str(env / "run")])
    assert result.exit_code == 0, result.output
    assert f"downloading WikiText-2 v1 train: {wikitext.HF_FILES['train']} of dataset Salesforce/wikitext from " \
           f"{hub.url}" in result.output
    dest = env / "cache" / "data" / "wikitext-2"
    assert (dest / "train.txt").read_text(encoding="utf-8") == train and (dest / "valid.txt").read_bytes() == \
        (wikitext_dir / "valid.txt").read_bytes()
    assert json.loads((env / "run" / "report.json").read_text())["steps"] == 2
    assert {f for m, f, _ in hub.log if m == "GET"} == set(files)  # train and valid; test is fetched when asked for
