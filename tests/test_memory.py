"""Big BitNet models are built and loaded packed, layer by layer: the peak RSS a build adds stays within 1.5x of the
model's parameter bytes as stored (an fp32 detour would add ~4x the packed projections on top)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

# A Llama whose projections dominate (as in TinyLlama): 201M projection weights, 50 MB packed; embeddings 16 MB.
_SETUP = """
import json, psutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
from bitnet_fast import tinyllama
from bitnet_fast.nn import convert, materialize, meta_parameters
def config(layers):
    return LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=2048, tie_word_embeddings=False)


def vm_hwm():  # peak RSS since the last reset (VmHWM; reset by writing 5 to /proc/self/clear_refs)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""
_REPORT = """
peak = vm_hwm()
with torch.inference_mode():  # and the model runs
    assert model(torch.randint(0, 2048, (1, 6))).logits.isfinite().all()
print(json.dumps({"increase": peak - before, "param_bytes": tinyllama.parameter_bytes(model),
                  "meta": [n for n, t in model.state_dict().items() if t.is_meta]}))
"""


def _run(body: str, tmp_path) -> dict:
    """Run `body` (which builds `model` from `cfg`) once on a one-layer model of the same shapes, so that every kernel
    it needs on this host's ISA is compiled and loaded (a fixed cost, not the model's), then on the 12-layer model
    with the peak RSS counter reset."""
    body = textwrap.dedent(body)
    code = (textwrap.dedent(_SETUP) + "cfg = config(1)\n" + body + "del model\n"
            + "open('/proc/self/clear_refs', 'w').write('5')\nbefore = psutil.Process().memory_info().rss\n"
            + "cfg = config(12)\n" + body + textwrap.dedent(_REPORT))
    # A clean environment: torch.compile in this process sets _TORCHINDUCTOR_* variables that make a child
    # import inductor (~150 MiB) on its own.
    env = {k: v for k, v in os.environ.items() if "TORCHINDUCTOR" not in k} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["meta"]
    return r


def test_convert_pack_on_meta_model_builds_layer_by_layer(tmp_path):
    r = _run("""
        with meta_parameters():
            model = LlamaForCausalLM(cfg)
        materialize(convert(model, pack=True), model._init_weights)
        """, tmp_path)
    assert r["increase"] <= 1.5 * r["param_bytes"], r
    print(f"convert(meta model, pack=True): peak RSS +{r['increase'] / r['param_bytes']:.2f}x the parameter bytes")


def test_load_packed_allocates_no_fp32_model(tmp_path):
    save = textwrap.dedent(_SETUP) + textwrap.dedent("""
        from bitnet_fast.export import save_packed
        for layers in (1, 12):
            with meta_parameters():
                model = LlamaForCausalLM(config(layers))
            materialize(convert(model, pack=True), model._init_weights)
            save_packed(model, f"m{layers}.safetensors")
        """)
    subprocess.run([sys.executable, "-c", save], check=True, cwd=tmp_path, timeout=600)  # a process of its own
    r = _run("""
        from bitnet_fast.export import load_packed
        model = load_packed(lambda: LlamaForCausalLM(cfg), f"m{cfg.num_hidden_layers}.safetensors")
        """, tmp_path)
    assert r["increase"] <= 1.5 * r["param_bytes"], r
    print(f"load_packed(factory): peak RSS +{r['increase'] / r['param_bytes']:.2f}x the parameter bytes")
