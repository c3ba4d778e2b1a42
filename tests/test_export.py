"""save_packed / load_packed: round trips in both file formats, sizes, atomic writes, clear errors."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bitnet_fast.export as export
from bitnet_fast import kernels
from bitnet_fast.export import load_packed, read_metadata, save_packed
from bitnet_fast.nn import BitLinear, convert, pack_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 128), nn.ReLU(), nn.Linear(128, 40, bias=False), nn.ReLU(), nn.Linear(40, 3))


@pytest.fixture
def model_and_output():
    model = convert(_mlp(), skip=("4",))
    x = torch.randn(4, 300)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.parametrize("fmt", ["i2", "tq1"])
@pytest.mark.parametrize("packed", [False, True])
def test_round_trip(tmp_path, model_and_output, fmt, packed):
    model, x, y = model_and_output
    if packed:
        model = pack_model(model)
    path = save_packed(model, tmp_path / "m.safetensors", fmt=fmt)
    assert read_metadata(path)["format"] == fmt
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    for target in (_mlp, convert(_mlp(), skip=("4",))):  # a factory of nn.Linear models, or a converted model
        loaded = load_packed(target, path)
        layers = [m for m in loaded.modules() if isinstance(m, BitLinear)]
        assert len(layers) == 2 and all(m.is_packed for m in layers)
        assert all(m.packed_weight.format == kernels.pack(torch.ones(1, 1)).format for m in layers)
        assert type(loaded[4]) is nn.Linear
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), y)


def test_tq1_is_smaller(tmp_path, model_and_output):
    model = model_and_output[0]
    i2 = save_packed(model, tmp_path / "i2.safetensors", fmt="i2").stat().st_size
    tq1 = save_packed(model, tmp_path / "tq1.safetensors", fmt="tq1").stat().st_size
    latent = sum(p.numel() * 4 for p in model.parameters())
    assert tq1 < i2 < latent / 4


def test_files_hold_about_1_6_and_2_bits_per_weight(tmp_path):
    """README/docs: tq1 files ~1.6 bits/weight (5 weights a byte), i2 ~2 (K padded to 128), everything included."""
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(1280, 1024, bias=False), nn.Linear(1000, 640, bias=False)), skip=())
    weights = 1280 * 1024 + 1000 * 640
    bits = {fmt: save_packed(model, tmp_path / f"{fmt}.safetensors", fmt=fmt).stat().st_size * 8 / weights
            for fmt in ("tq1", "i2")}
    assert 1.6 <= bits["tq1"] < 1.62 and 2.0 <= bits["i2"] < 2.03, bits  # 1000 pads to 1024 in i2: +1.5%


def test_tied_weights_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = convert(transformers.LlamaForCausalLM(cfg), pack=True).eval()
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    path = save_packed(model, tmp_path / "llama.safetensors")
    with safe_open(path, framework="pt") as f:  # the tied embedding is written once, the head is an alias
        assert ("lm_head.weight" in f.keys()) != ("model.embed_tokens.weight" in f.keys())
    loaded = load_packed(lambda: transformers.LlamaForCausalLM(cfg).eval(), path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        got = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_corrupt_and_truncated_files(tmp_path, model_and_output):
    path = save_packed(model_and_output[0], tmp_path / "m.safetensors")
    blob = path.read_bytes()
    for name, data in {"truncated": blob[: len(blob) - 50], "garbage": b"\x00" * 64, "empty": b""}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="corrupt or truncated"):
            load_packed(_mlp, bad)
    with pytest.raises(FileNotFoundError):
        load_packed(_mlp, tmp_path / "missing.safetensors")


def _rewrite_header(path, edit) -> None:
    """Edit the JSON header of a safetensors file in place (same tensors)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def test_version_and_kind_checked(tmp_path, model_and_output):
    path = save_packed(model_and_output[0], tmp_path / "m.safetensors")
    _rewrite_header(path, lambda h: h["__metadata__"].update(layout_version="7"))
    with pytest.raises(ValueError, match="layout version 7"):
        load_packed(_mlp, path)
    other = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a bitnet-fast packed model"):
        load_packed(_mlp, other)


def test_wrong_model_is_clear(tmp_path, model_and_output):
    path = save_packed(model_and_output[0], tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="out, in"):
        load_packed(nn.Sequential(nn.Linear(300, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 3)), path)
    with pytest.raises(ValueError, match="does not have"):
        load_packed(nn.Sequential(nn.Linear(300, 128)), path)
    with pytest.raises(ValueError, match="ReLU"):
        load_packed(nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU()), path)
    with pytest.raises(TypeError, match="factory"):
        load_packed(lambda: "model", path)


def test_bad_save_arguments(tmp_path, model_and_output):
    with pytest.raises(ValueError, match="fmt"):
        save_packed(model_and_output[0], tmp_path / "m.safetensors", fmt="i8")
    with pytest.raises(ValueError, match="convert"):
        save_packed(_mlp(), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="model"):
        save_packed({}, tmp_path / "m.safetensors")


def test_failed_write_keeps_old_file(tmp_path, model_and_output, monkeypatch):
    path = save_packed(model_and_output[0], tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_packed(model_and_output[0], path, fmt="i2")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _trained_lm(tie: bool):
    """A small bitnet_fast LM with spread-out weights (as after training), unpacked like a training checkpoint."""
    from bitnet_fast.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, hidden=96,
                                    max_seq_len=32, tie_embeddings=tie)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize(("fmt", "tie"), [("tq1", True), ("i2", False)])
def test_lm_round_trip_is_bit_identical_and_needs_only_the_file(tmp_path, fmt, tie):
    from bitnet_fast.decode import PackedDecoder
    from bitnet_fast.export import load_lm

    model = _trained_lm(tie)
    path = save_packed(model, tmp_path / "lm.safetensors", fmt=fmt)  # packs on the way out; model stays as is
    loaded = load_lm(path)
    assert loaded.config == model.config and not loaded.training
    assert (loaded.head.weight is loaded.tok_emb.weight) == tie
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        want, got = pack_model(model)(ids)[0], loaded(ids)[0]
    assert torch.equal(got, want)
    logits = [PackedDecoder.from_model(m, head="fp32").forward(ids[0].tolist()) for m in (model, loaded)]
    assert torch.equal(logits[0], logits[1])


def test_load_lm_needs_an_lm_file(tmp_path, model_and_output):
    from bitnet_fast.export import load_lm

    path = save_packed(model_and_output[0], tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="no bitnet-fast LM config"):
        load_lm(path)
    lm = save_packed(_trained_lm(True), tmp_path / "lm.safetensors")
    _rewrite_header(lm, lambda h: h["__metadata__"].update(lm_config='{"n_layer": "two"'))
    with pytest.raises(ValueError, match="corrupt lm_config"):
        load_lm(lm)


def test_llama_round_trip_logits_and_decoder_are_bit_identical(tmp_path):
    transformers = pytest.importorskip("transformers")
    from bitnet_fast.decode import PackedDecoder

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = convert(transformers.LlamaForCausalLM(cfg), pack=True).eval()
    path = save_packed(model, tmp_path / "llama.safetensors", fmt="tq1")
    assert "lm_config" not in read_metadata(path)
    loaded = load_packed(lambda: transformers.LlamaForCausalLM(cfg).eval(), path)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    logits = [PackedDecoder.from_model(m).forward(ids[0].tolist()) for m in (model, loaded)]
    assert torch.equal(logits[0], logits[1])


def test_cli_export_writes_a_file_load_lm_reads(tmp_path):
    from click.testing import CliRunner

    from bitnet_fast.checkpoint import save_checkpoint
    from bitnet_fast.cli import main
    from bitnet_fast.export import load_lm

    model = _trained_lm(True)
    ckpt = {"model": model.state_dict(), "model_config": model.config.to_dict(), "train_config": {},
            "tokenizer": "{}", "step": 7}
    path = save_checkpoint(tmp_path / "run", ckpt, keep_last=1)
    res = CliRunner().invoke(main, ["export", str(path), str(tmp_path / "lm.safetensors")])
    assert res.exit_code == 0, res.output
    assert "step 7" in res.output and read_metadata(tmp_path / "lm.safetensors")["format"] == "tq1"
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_lm(tmp_path / "lm.safetensors")(ids)[0], pack_model(model)(ids)[0])
    fp = save_checkpoint(tmp_path / "fp", {**ckpt, "model_config": {**ckpt["model_config"], "linear": "fp"}}, 1)
    res = CliRunner().invoke(main, ["export", str(fp), str(tmp_path / "fp.safetensors")])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "linear='fp'" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "fp.safetensors").exists()
