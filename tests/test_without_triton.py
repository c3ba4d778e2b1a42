"""Without triton: a fresh Python in which `import triton` fails (as on a machine without it) still imports the
package and trains on CPU, and CUDA tensors fall back to the reference kernels with one warning. A subprocess,
because the test process has imported triton and the backends already."""

from __future__ import annotations

import os
import subprocess
import sys

MISSING_TRITON = r"""
import sys, warnings
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on a machine without it
import torch
import bitnet_fast, bitnet_fast.kernels as K
from bitnet_fast.kernels import reference as R
from bitnet_fast.nn import BitLinear

torch.manual_seed(0)
layer, x = BitLinear(96, 24), torch.randn(3, 96, requires_grad=True)
y = layer(x)  # CPU (Numba) training forward and backward: nothing on this path needs triton
y.sum().backward()
x2, w2 = x.detach().clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
y2 = R.ste_linear(x2, w2, layer.bias.detach())
y2.sum().backward()
torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert K.backend_for("cuda") == "reference" and K.backend_for("cuda") == "reference"
msgs = [str(w.message) for w in caught]
assert len(msgs) == 1 and "triton backend is unavailable" in msgs[0], msgs
if torch.cuda.is_available():  # the fallback serving a real op on the GPU
    layer = layer.cuda()
    with torch.no_grad():
        got = layer(x.detach().cuda())
    assert layer.packed_weight.format == "i2" and torch.equal(got.cpu(), R.bitlinear(x.detach(), layer.weight.cpu(),
                                                                                     layer.bias.cpu()))
assert sys.modules["triton"] is None and "bitnet_fast.kernels.gpu" not in sys.modules
print("OK")
"""


def test_missing_triton_falls_back_in_a_fresh_process():
    """In a fresh Python where `import triton` fails: the package imports, a BitLinear trains on CPU and matches the
    reference, CUDA tensors resolve to the reference backend with one warning and, where a GPU is present, a
    BitLinear forward on CUDA equals the reference."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BITNET_FAST_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", MISSING_TRITON], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
