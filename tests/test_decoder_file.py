"""PackedDecoder files (bitnet_fast.decoder_file): a loaded decoder gives bit-identical logits, its weights are
views into the file's map (no copy), and a damaged or foreign file is refused with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from bitnet_fast.decode import PackedDecoder
from bitnet_fast.decoder_file import is_decoder_file, load_decoder, save_decoder
from bitnet_fast.model import ModelConfig, build_model
from bitnet_fast.nn import pack_model


def _lm(n_embd: int = 64, tie: bool = True, mlp: str = "swiglu", subln: bool = False):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=n_embd, hidden=96, max_seq_len=48,
                                    mlp=mlp, n_kv_head=2, tie_embeddings=tie)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    if subln:
        for block in model.blocks:
            for lin in (block.attn.wo, block.mlp.down):
                lin.norm = torch.nn.RMSNorm(lin.in_features, eps=1e-6)
                torch.nn.init.uniform_(lin.norm.weight, 0.5, 1.5)
    return pack_model(model)


def _logits(dec: PackedDecoder, ids: list[int]) -> torch.Tensor:
    dec.reset()
    return torch.stack([dec.forward(ids[:5]), *(dec.forward([t]) for t in ids[5:])])


def _file_map(a: np.ndarray) -> np.memmap:
    """The whole-file memory map `a` is a view into (AssertionError when it owns its data)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    assert isinstance(a, np.memmap), "an array with its own copy of the data"
    return a


# (head, embedding_int8, model): tied int8 head + embedding (48 wide: the head rows are padded to 64), untied int8,
# fp32 head with an fp32 embedding, ReLU^2 with SubLN
CASES = [("int8", True, dict(n_embd=48)), ("int8", True, dict(tie=False)), ("fp32", False, {}),
         ("int8", False, dict(mlp="relu2", subln=True))]


@pytest.mark.parametrize(("head", "embedding_int8", "model"), CASES)
def test_a_loaded_decoder_gives_the_same_logits_from_views_into_the_file(tmp_path, head, embedding_int8, model):
    dec = PackedDecoder.from_model(_lm(**model), head, embedding_int8)
    path = save_decoder(dec, tmp_path / "m.decoder")
    loaded = load_decoder(path)
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.equal(_logits(loaded, ids), _logits(dec, ids))
    assert list(loaded.generate(ids[:5], 20)) == list(dec.generate(ids[:5], 20))
    mapped = _file_map(loaded._projections["q"][0])  # weights and head: views into this map
    low, high = mapped.ctypes.data, mapped.ctypes.data + mapped.nbytes
    weights = [a for ws in loaded._projections.values() for a in ws]
    weights += [loaded._head_q] if loaded.head_kind == "int8" else [loaded._head.numpy()]
    assert all(low <= a.ctypes.data < high for a in weights)
    assert loaded.nbytes == dec.nbytes
    short = load_decoder(path, max_len=10, verify=False)
    assert short.config.max_len == 10 and torch.equal(_logits(short, ids[:10]), _logits(dec, ids[:10]))


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    path = save_decoder(PackedDecoder.from_model(_lm(), "int8", True), tmp_path / "m.decoder")
    data = path.read_bytes()
    flipped = tmp_path / "flipped.decoder"
    flipped.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    with pytest.raises(ValueError, match="sha256"):
        load_decoder(flipped)
    truncated = tmp_path / "truncated.decoder"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_decoder(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not a bitnet-fast decoder file"):
        load_decoder(foreign)
    assert is_decoder_file(path) and is_decoder_file(truncated)  # a damaged one is named as such when loaded
    assert not any(is_decoder_file(p) for p in (foreign, tmp_path / "none", tmp_path))
    assert load_decoder(path).tokenizer is None
    tok = save_decoder(load_decoder(path), tmp_path / "tok.decoder", tokenizer='{"model": "x"}')
    assert load_decoder(tok).tokenizer == '{"model": "x"}'
    with pytest.raises(ValueError, match="max_len=49"):
        load_decoder(path, max_len=49)
    with pytest.raises(FileNotFoundError, match="save_decoder"):
        load_decoder(tmp_path / "missing.decoder")


def test_the_whole_model_benchmark_measures_the_decoder_mapped_from_its_cached_file(tmp_path, monkeypatch):
    """tinyllama's decoder variant: a child process writes the random-weight decoder once (cached beside the tuning
    file), the measuring process maps it; the file holds exactly what build_decoder makes."""
    from bitnet_fast import tinyllama

    monkeypatch.setenv("BITNET_FAST_TUNING", str(tmp_path / "tuning.json"))
    shape = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 97}
    r = tinyllama.measure_decoder(1, 12, 3, shape=shape)  # (its warm-up runs 9 tokens)
    path = tinyllama.decoder_file(1, 12 + 3 + 8, shape)
    assert path.parent == tmp_path and r["file_bytes"] == path.stat().st_size
    assert r["decode_tokens"] == 3 and r["decode_tokens_per_sec"] > 0 and r["load_seconds"] >= 0
    ids = list(range(0, 97, 7))
    assert torch.equal(_logits(load_decoder(path), ids), _logits(tinyllama.build_decoder(1, 23, shape), ids))
