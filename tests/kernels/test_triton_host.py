"""Host work of the Triton wrappers, and where their dropout seeds come from.

A repeated eager call of a wrapper (same shapes, strides, dtypes) runs its checks, one lookup of
its launch plan, the allocation of its outputs and the kernel launch: counted here as the ATen ops
a TorchDispatchMode sees around the call, outside the kernel launches (on a GPU a launch is no ATen
op; the interpreter's copies of the arguments are not counted). The only ops allowed are
``aten.empty.memory_format``, once per output or kernel workspace, and the LayerNorm backward's
zeroed completion ticket (``aten.zeros``); no torch.broadcast_shapes,
views, seed draws, reductions or dtype casts, no autotuner pass, and one launch per kernel.

Seeds: on CUDA each op reserves a Philox offset from the device generator on the host (no op at
all). The CPU generator (the interpreter's) has no offsets, so these tests give the CPU device a
stand-in with the CUDA generator's interface (``initial_seed``, ``get_offset``, ``set_offset``) to
run that path; without it the interpreter draws one seed tensor per op with torch.randint.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction

from mldecoder_fast.ops import triton_ops as T
from mldecoder_fast.ops import triton_support as S

AVAILABLE, DETAIL = S.triton_status()
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not AVAILABLE or torch.cuda.is_available(),
                                 reason=f"interpreter-only host checks ({DETAIL})")]

TRITON = T.TritonOps()
B, K, N, H, D, GS, C = 2, 5, 19, 2, 16, 3, 14


class _Philox:
    """The CUDA generator's Philox interface, for CPU tensors."""

    def __init__(self, seed: int):
        self.seed, self.offset = seed, 0

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset


@pytest.fixture
def philox(monkeypatch):
    gen = _Philox(1234)
    monkeypatch.setattr(S, "_philox_generator", lambda device: gen)
    return gen


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return dict(t1=r(K, D), o=r(B, K, D), q=r(B, K, D), kv=r(B, N, 2 * D), qk=r(H, K, D),
                mem=r(B, N, D), lw=1 + 0.1 * r(D), lb=0.1 * r(D), w=r(K, D, GS) / 4, bias=r(C))


# (name, call(inputs, p), outputs + workspaces allocated per call); one kernel launch each, the
# decode two (the LayerNorm statistics, then the group FC)
WRAPPERS = [
    ("layer_norm", lambda a, p: TRITON.residual_dropout_layer_norm(a["t1"], a["o"], p, a["lw"],
                                                                   a["lb"], 1e-5), 3),
    ("attention", lambda a, p: TRITON.attention(a["q"], a["kv"], H, p), 2),
    ("shared_query_attention",
     lambda a, p: TRITON.shared_query_attention(a["qk"], a["mem"], a["mem"], H, p), 2),
    ("group_fc", lambda a, p: TRITON.group_fc(a["o"], a["w"], a["bias"], C), 1),
    ("decode", lambda a, p: TRITON.decode(a["t1"], a["o"], p, a["lw"], a["lb"], 1e-5, a["w"],
                                          a["bias"], C), 3),
]
LAUNCHES = {"decode": 2}


def _host_work(fn):
    """(output, ATen ops, torch.broadcast_shapes calls, autotuner passes, kernel launches) of one
    call of ``fn``."""
    calls = {"broadcast": 0, "autotune": 0, "launch": 0}
    real_broadcast, real_run, real_launch = torch.broadcast_shapes, Autotuner.run, InterpretedFunction.run

    def broadcast(*shapes):
        calls["broadcast"] += 1
        return real_broadcast(*shapes)

    def run(self, *args, **kwargs):
        calls["autotune"] += 1
        return real_run(self, *args, **kwargs)

    def launch(self, *args, **kwargs):
        calls["launch"] += 1
        with _disable_current_modes():
            return real_launch(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "broadcast_shapes", broadcast)
        mp.setattr(Autotuner, "run", run)
        mp.setattr(InterpretedFunction, "run", launch)
        with _AtenOps() as mode:
            out = fn()
    return out, mode.ops, calls["broadcast"], calls["autotune"], calls["launch"]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("name,fn,empties", WRAPPERS, ids=[w[0] for w in WRAPPERS])
def test_repeated_call_host_work(name, fn, empties, p, philox):
    a = _inputs()
    with torch.no_grad():
        first = fn(a, p)                 # builds the launch plan (and autotunes)
        philox.set_offset(0)             # same Philox offset: the same masks as the first call
        out, ops, broadcasts, autotunes, launches = _host_work(lambda: fn(a, p))
    assert ops == ["aten.empty.memory_format"] * empties, f"{name}: ATen ops per call {ops}"
    assert (broadcasts, autotunes) == (0, 0), f"{name}: broadcast_shapes, autotuner passes"
    assert launches == LAUNCHES.get(name, 1)
    assert torch.equal(first, out)


def test_backward_host_functions_host_work():
    """The backward host functions: dgrad/wgrad/LN-backward workspaces only (the LayerNorm's
    affine-gradient partial sums are reduced inside its kernel, not by separate sums)."""
    from mldecoder_fast.kernels.attention import attention_backward, attention_forward
    from mldecoder_fast.kernels.group_fc_decode import decode_backward, decode_forward
    from mldecoder_fast.kernels.layer_norm import ln_backward, ln_forward
    a = _inputs()
    seed = torch.tensor([5], dtype=torch.int64)
    _y, mean, rstd = ln_forward(a["t1"], a["o"], seed, 4, 0.1, a["lw"], a["lb"], 1e-5)
    o, lse = attention_forward(a["q"], a["kv"], seed, 4, H, 0.1, torch.float32)
    _l, m3, r3 = decode_forward(a["t1"], a["o"], seed, 4, 0.1, a["lw"], a["lb"], 1e-5, a["w"],
                                a["bias"], C, torch.float32)
    dout = torch.randn(B, C)
    empty, zeros = "aten.empty.memory_format", "aten.zeros.default"
    # the LayerNorm backward: dz, dx, partials, its completion ticket (zeroed per launch), dw, db
    ln = [empty, empty, empty, zeros, empty, empty]
    calls = [  # (call, ATen ops: allocations of outputs and workspaces, launches)
        (lambda: ln_backward(a["o"], a["t1"], a["o"], seed, 4, 0.1, a["lw"], mean, rstd,
                             torch.float32), ln, 1),
        (lambda: attention_backward(o, a["q"], a["kv"], o, lse, seed, 4, H, 0.1), [empty] * 3, 2),  # dkv, delta, dq
        (lambda: decode_backward(dout, a["t1"], a["o"], seed, 4, 0.1, a["lw"], a["lb"], m3, r3,
                                 a["w"], torch.float32), [empty, *ln, empty], 3),  # dh, the LN backward's, dW
    ]
    for i, (fn, expected_ops, launches) in enumerate(calls):
        first = fn()
        again, ops, broadcasts, autotunes, n = _host_work(fn)
        assert ops == expected_ops, f"call {i}: ATen ops {ops}"
        assert (broadcasts, autotunes, n) == (0, 0, launches)
        for x, y in zip(first, again, strict=True):
            assert torch.equal(x, y), f"call {i}: a repeated call differs"


def test_layer_norm_backward_draws_a_ticket_per_launch(monkeypatch):
    """The LayerNorm backward's last-program reduction counts finished programs on a ticket: each
    launch has its own, zero when it starts, so two launches in flight at once (streams, CUDA
    graph replays) never share one (one per launch plan did)."""
    from mldecoder_fast.kernels import _common
    from mldecoder_fast.kernels.layer_norm import _ln_bwd_kernel, ln_backward, ln_forward
    a = _inputs()
    seed = torch.tensor([5], dtype=torch.int64)
    _y, mean, rstd = ln_forward(a["t1"], a["o"], seed, 4, 0.1, a["lw"], a["lb"], 1e-5)
    tickets = []
    call = _common.Launch.__call__

    def spy(self, *tensors, lead=()):
        if self.kernel is _ln_bwd_kernel:
            tickets.append((tensors[10], int(tensors[10].sum())))
        return call(self, *tensors, lead=lead)
    monkeypatch.setattr(_common.Launch, "__call__", spy)
    for _ in range(2):
        ln_backward(a["o"], a["t1"], a["o"], seed, 4, 0.1, a["lw"], mean, rstd, torch.float32)
    assert len(tickets) == 2 and all(value == 0 for _, value in tickets)
    assert tickets[0][0] is not tickets[1][0], "two launches share one completion ticket"


# ------------------------------------------------------------------------------------------------
# dropout seeds
# ------------------------------------------------------------------------------------------------

def _ln_train(a, p=0.3):
    o = a["o"].detach().requires_grad_(True)
    y = TRITON.residual_dropout_layer_norm(a["t1"], o, p, a["lw"], a["lb"], 1e-5)
    return o, y


def test_seeds_from_the_generator_philox_offset(philox):
    """Each op reserves 4 offsets: consecutive steps draw different masks; resetting the generator
    (as torch.manual_seed does) gives the same masks again; reseeding gives new ones."""
    a = _inputs()
    _o, y1 = _ln_train(a)
    assert philox.offset == 4
    _o, y2 = _ln_train(a)
    assert philox.offset == 8
    assert not torch.equal(y1, y2), "two steps drew the same mask"
    philox.set_offset(0)
    _o, y3 = _ln_train(a)
    assert torch.equal(y1, y3), "the same generator state drew a different mask"
    philox.seed, philox.offset = 99, 0
    _o, y4 = _ln_train(a)
    assert not torch.equal(y1, y4), "a new generator seed drew the same mask"


def test_backward_uses_its_forwards_mask(philox):
    """Two forwards before the backwards (gradient accumulation): each backward regenerates its own
    forward's mask, equal to the kernels' documented mask for (seed, offset)."""
    from mldecoder_fast.kernels._common import dropout_mask
    a, p = _inputs(), 0.3
    o1, y1 = _ln_train(a, p)
    o2, y2 = _ln_train(a, p)
    g = torch.randn_like(y1)
    (d1,) = torch.autograd.grad(y1, o1, g)
    (d2,) = torch.autograd.grad(y2, o2, g)
    seed = torch.tensor([1234], dtype=torch.int64)
    for offset, o, d in ((0, o1, d1), (4, o2, d2)):
        keep = dropout_mask(seed, B * K, D, p, offset).view(B, K, D)
        ref_o = o.detach().requires_grad_(True)
        ref = torch.nn.functional.layer_norm(a["t1"] + ref_o * keep / (1 - p), (D,), a["lw"],
                                             a["lb"], 1e-5)
        assert_close(f"forward at offset {offset}", ref, y1 if offset == 0 else y2, 1e-5)
        assert_close(f"backward at offset {offset}", torch.autograd.grad(ref, ref_o, g)[0], d, 1e-5)


def test_graph_capture_and_compile_draw_a_seed_tensor(philox, monkeypatch):
    """While a CUDA graph is captured (or under torch.compile) the seed is a fresh torch.randint
    draw, which PyTorch replays with new values, and the generator's offset is left alone."""
    seeds = S.DropoutSeeds()
    like = torch.empty(1)
    held, offset = seeds(0.1, like)
    assert offset == 0 and philox.offset == 4 and held.item() == 1234
    monkeypatch.setattr(S, "_capturing", lambda device: True)
    with _AtenOps() as mode:
        drawn, offset = seeds(0.1, like)
    assert offset == 0 and philox.offset == 4 and drawn is not held
    assert mode.ops == ["aten.randint.low"], mode.ops
    assert seeds(0.0, like) == (None, 0)
