"""torch.compile(MLDecoderFast(...), fullgraph=True) as the first thing a process does with the
package: backend resolution (which loads the compiled extension behind a lock) must not run inside
the traced region. Each case runs in a fresh interpreter, where nothing has been resolved yet."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SCRIPT = """
import torch
from mldecoder_fast import MLDecoder, MLDecoderFast
torch.manual_seed(0)
ref = MLDecoder(30, 4, 32, 24)
fast = MLDecoderFast(30, 4, 32, 24, backend={backend!r})
fast.load_state_dict(ref.state_dict())
x = torch.randn(2, 24, 3, 3)
if {train!r}:
    for m in (ref, fast):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            elif isinstance(mod, torch.nn.MultiheadAttention):
                mod.dropout = 0.0
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    a, b = ref.decoder.embed_standart.weight.grad, fast.decoder.embed_standart.weight.grad
else:
    ref.eval(), fast.eval()
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    with torch.no_grad():
        a, b = ref(x), compiled(x)
err = ((a - b).norm() / a.norm()).item()
assert err < 1e-5, err
print("OK", fast.active_backend)
"""


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp", "cuda", "triton"])
def test_compile_fullgraph_in_a_fresh_process(backend, train):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _SCRIPT.format(backend=backend, train=train)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
