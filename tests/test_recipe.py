"""Training recipes (recipe.py): per-model defaults and their precedence, the lr and weight-decay schedules, AdamW's
parameter groups, and SubLN, which the recipe sweep decides on for both twins alike."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet_fast.config import TrainConfig
from bitnet_fast.corpus import load_corpus, prepare_split
from bitnet_fast.model import ModelConfig, SubLNLinear, build_model
from bitnet_fast.recipe import RECIPES, lr_factor, param_groups, weight_decay_factor, with_recipe


def test_each_model_gets_its_recipe_unless_told_otherwise():
    for linear in ("bitnet", "fp"):
        cfg = with_recipe(TrainConfig(linear=linear))
        assert (cfg.lr, cfg.schedule, cfg.warmup_frac) == tuple(RECIPES[linear][k] for k in ("lr", "schedule",
                                                                                             "warmup_frac"))
    both = TrainConfig(lr=1e-4, lr_bitnet=7e-3, schedule_fp="two_stage", warmup_frac=0.2)
    b, f = with_recipe(TrainConfig(**{**both.__dict__, "linear": "bitnet"})), with_recipe(
        TrainConfig(**{**both.__dict__, "linear": "fp"}))
    assert (b.lr, b.schedule, b.warmup_frac) == (7e-3, RECIPES["bitnet"]["schedule"], 0.2)  # per-model flag wins
    assert (f.lr, f.schedule, f.warmup_frac) == (1e-4, "two_stage", 0.2)  # --lr applies to the model without its own
    assert with_recipe(b) == b  # resolving twice changes nothing (a resumed run's config is already resolved)


def test_subln_twins_share_one_architecture():
    cfg = dict(vocab_size=50, n_layer=2, n_head=2, n_embd=16, hidden=32, max_seq_len=8, subln=True)
    bit, fp = build_model(ModelConfig(**cfg, linear="bitnet")), build_model(ModelConfig(**cfg, linear="fp"))
    shapes = {k: v.shape for k, v in bit.state_dict().items()}
    assert shapes == {k: v.shape for k, v in fp.state_dict().items()}
    plain = build_model(ModelConfig(**{**cfg, "subln": False}, linear="fp"))
    assert set(shapes) - set(plain.state_dict()) == {  # one norm before o and one before down per layer
        f"blocks.{i}.{m}.norm.weight" for i in range(2) for m in ("attn.wo", "mlp.down")}
    assert set(plain.state_dict()) < set(shapes)
    fp.load_state_dict(bit.state_dict())  # the twins load each other's weights: only the linear maps differ
    layer = fp.blocks[0].mlp.down
    assert isinstance(layer, SubLNLinear)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 32)
    expected = F.linear(F.rms_norm(x, (32,), layer.norm.weight, 1e-6), layer.weight)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(layer(x), F.linear(x, layer.weight))  # the norm is applied, not only held
    idx = torch.randint(0, 50, (2, 8))
    _, loss = bit(idx, idx)
    loss.backward()
    assert bit.blocks[1].attn.wo.norm.weight.grad is not None  # BitLinear's own SubLN norm trains


def test_prepare_writes_an_optional_test_split(tmp_path):
    lines = [f"line {i} of some words here" for i in range(40)]
    for name, part in (("train", lines[:30]), ("valid", lines[30:35]), ("test", lines[35:])):
        (tmp_path / f"{name}.txt").write_text("\n".join(part) + "\n")
    manifest = prepare_split([tmp_path / "train.txt"], tmp_path / "out", [tmp_path / "valid.txt"], vocab_size=60,
                             test=[tmp_path / "test.txt"])
    assert set(manifest["splits"]) == {"train", "valid", "test"} and manifest["splits"]["test"]["words"] == 5 * 7
    assert len(load_corpus(tmp_path / "out").splits["test"].tokens) == manifest["splits"]["test"]["tokens"]
    without = prepare_split([tmp_path / "train.txt"], tmp_path / "out2", [tmp_path / "valid.txt"], vocab_size=60)
    assert set(without["splits"]) == {"train", "valid"}


def test_schedules():
    total, warmup = 100, 10
    cos = [lr_factor(s, total, warmup, "cosine", 0.1) for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[warmup - 1] == 1.0 and cos[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[warmup:], cos[warmup + 1 :], strict=False))
    assert cos[-1] == pytest.approx(0.1, abs=0.01)
    two = [lr_factor(s, total, warmup, "two_stage", 0.1) for s in range(total)]
    mid = warmup + (total - warmup) // 2
    assert two[mid - 1] > 0.5 > two[mid] == pytest.approx(0.3) and two[-1] == pytest.approx(0.1, abs=0.01)
    assert weight_decay_factor(mid, total, warmup, "two_stage") == 0.0
    assert weight_decay_factor(mid, total, warmup, "cosine") == 1.0
    assert math.isclose(lr_factor(0, 1, 1, "cosine", 0.1), 1.0)


def test_no_weight_decay_on_norms_and_embeddings():
    from bitnet_fast.model import ModelConfig, build_model

    model = build_model(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, hidden=32, max_seq_len=8))
    decay, rest = param_groups(model, 0.1)
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert any(p is model.tok_emb.weight for p in rest["params"])
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 7  # q k v o gate up down
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
