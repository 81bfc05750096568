"""CUDA graphs: ``cuda_graphed`` (serving), ``torch.cuda.make_graphed_callables`` (training) and
``torch.compile(mode="reduce-overhead")``.

Without a GPU, the wrapper's logic (size selection, padding, input checks, staleness detection,
recapture policy, output copies, the eager fallback) runs against ``FrozenGraphs``, a stand-in
for ``torch.cuda.CUDAGraph``; the head's capture safety (no host synchronisation, nothing cached
during a capture) is checked on fake CUDA tensors. The tests marked "needs a CUDA device" capture
real graphs (bench/gpu_check.sh runs them). How much faster a graphed head is, is the benchmark's
question, not a test's: the ``graphed-fast-<backend>`` rows of ``mldecoder-fast bench``
(mldecoder_fast/benchmark/runner.py, ``graphed_head``).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from heads import disable_dropout_, make_input, make_pair, randomize_
from helpers import assert_close
from torch import nn

from mldecoder_fast import MLDecoderFast, cuda_graphed

C = 24          # input features of the small test heads; inputs are [B, 24, 3, 3]
SAMPLE = (C, 3, 3)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (real CUDA graph capture)")


class FrozenGraphs:
    """A CPU stand-in for ``torch.cuda.CUDAGraph``. ``capture`` runs the forward once; a replay
    recomputes the output from the input buffer with a copy of the module made at capture. A real
    graph likewise keeps computing with the tensors it captured (it misses replaced tensors and
    moves); here even in-place updates are missed, so a wrapper that fails to recapture after any
    change serves stale logits and the tests below fail."""

    def __init__(self):
        self.captured = []      # batch sizes, in capture order
        self.replayed = []
        self.own_output = []    # per capture: whether the wrapper asked for an output of its own

    def capture(self, forward, module, static_input, own_output=False):
        frozen = copy.deepcopy(module)
        out = forward(frozen, static_input)
        self.captured.append(static_input.shape[0])
        self.own_output.append(own_output)
        return _FrozenGraph(self, forward, frozen, static_input, out), out


class _FrozenGraph:
    def __init__(self, log, forward, module, static_input, out):
        self.log, self.forward, self.module = log, forward, module
        self.static_input, self.out = static_input, out

    def replay(self):
        self.log.replayed.append(self.static_input.shape[0])
        self.out.copy_(self.forward(self.module, self.static_input))


def small_head(zsl=0, dtype=torch.float32, device="cpu"):
    _, head = make_pair(30 if not zsl else 1, 4, 32, C, zsl=zsl, dtype=dtype, device=device)
    return head.eval()


def eager(head, x, autocast_dtype=None):
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                         enabled=autocast_dtype is not None):
        return head(x)


# the wrapper's logic, with FrozenGraphs ---------------------------------------------------------
@pytest.mark.rounding
@pytest.mark.parametrize("zsl", [0, 1], ids=["plain", "zsl"])
def test_padded_batches_match_eager(zsl):
    head = small_head(zsl)
    graphs = FrozenGraphs()
    g = cuda_graphed(head, batch_sizes=(8, 1, 4), sample_shape=SAMPLE, graph_backend=graphs)
    assert graphs.captured == [8, 4, 1] and g.captures == 1
    # The first call leaves NaN in every row of the input buffer: the pad rows of the smaller
    # batches that follow hold them, and must not reach the real rows.
    poison = torch.full((8, *SAMPLE), float("nan"))
    assert torch.isnan(g(poison)).all()
    for batch, size in [(3, 4), (1, 1), (5, 8), (8, 8), (4, 4), (0, 1)]:
        x = make_input("map", batch, C)
        out = g(x)
        assert graphs.replayed[-1] == size, f"B={batch} ran the graph of {graphs.replayed[-1]}"
        assert_close(f"B={batch}", eager(head, x), out, 1e-6)
    assert g.captures == 1


class _LayoutGraphs(FrozenGraphs):
    """FrozenGraphs that also record the memory layout of the input each graph was captured with."""

    def __init__(self):
        super().__init__()
        self.channels_last = []

    def capture(self, forward, module, static_input, own_output=False):
        self.channels_last.append(static_input.is_contiguous(memory_format=torch.channels_last)
                                  and not static_input.is_contiguous())
        return super().capture(forward, module, static_input, own_output)


@pytest.mark.rounding
@pytest.mark.parametrize("how", ["first_call", "argument"])
def test_channels_last_is_captured_channels_last_and_other_layouts_are_copied_in(how):
    """A channels-last sample (the faster layout for the head's input projection) is captured
    channels-last, from the first call's input or ``memory_format=``; an input in another layout
    is copied into the captured one: same logits, no recapture."""
    head = small_head()
    graphs = _LayoutGraphs()
    x = make_input("map", 4, C).contiguous(memory_format=torch.channels_last)
    if how == "first_call":
        g = cuda_graphed(head, (4,), graph_backend=graphs)
    else:
        g = cuda_graphed(head, (4,), SAMPLE, memory_format=torch.channels_last, graph_backend=graphs)
    assert_close("channels-last input", eager(head, x), g(x), 1e-6)
    assert graphs.channels_last == [True]
    nchw = make_input("map", 3, C)
    assert_close("NCHW input, copied in", eager(head, nchw), g(nchw), 1e-6)
    assert g.captures == 1 and graphs.channels_last == [True]


def test_memory_format_argument_is_checked():
    with pytest.raises(ValueError, match="memory_format"):
        cuda_graphed(small_head(), (4,), SAMPLE, memory_format=torch.channels_last_3d,
                     graph_backend=FrozenGraphs())


def test_graphs_keep_what_the_head_derived_alive():
    """The graphs read the eval weights the warm-up derived and cached: the wrapper keeps them
    alive, so clear_caches() or a train()/eval() round trip (which clear the caches) frees nothing
    a replay reads."""
    import gc
    import weakref
    head = small_head()
    x = make_input("map", 4, C)
    eager(head, x)                       # what a warm-up does: derive and cache
    cached = head.caches.values()
    assert cached
    refs = [weakref.ref(t) for v in cached for t in (v if isinstance(v, tuple) else (v,))
            if isinstance(t, torch.Tensor)]
    g = cuda_graphed(head, (4,), SAMPLE, graph_backend=FrozenGraphs())
    del cached
    head.clear_caches()
    head.train()
    head.eval()
    gc.collect()
    assert all(r() is not None for r in refs), "a tensor the graphs read was freed"
    assert_close("after clear_caches and train/eval", eager(head, x), g(x), 1e-5)
    del g
    gc.collect()
    assert all(r() is None for r in refs)


def test_capture_reads_valid_cache_entries_and_stores_none(monkeypatch):
    """While a graph is captured the caches return a valid entry (the graph reads it where it is)
    and compute a missing one without storing it."""
    from mldecoder_fast.head import caches as caches_mod
    c = caches_mod.HeadCaches()
    w = torch.randn(3)
    stored = c.get("a", (w,), lambda: w * 2)
    monkeypatch.setattr(caches_mod, "capturing", lambda: True)
    assert c.get("a", (w,), lambda: w * 3) is stored
    fresh = c.get("b", (w,), lambda: w * 4)
    assert torch.equal(fresh, w * 4) and c.names() == ["a"]


@pytest.mark.rounding
def test_capture_at_first_call_without_sample_shape():
    head = small_head()
    graphs = FrozenGraphs()
    g = cuda_graphed(head, batch_sizes=(2, 4), graph_backend=graphs)
    assert graphs.captured == []
    x = make_input("tokens", 3, C, tokens=5)
    assert_close("tokens", eager(head, x), g(x), 1e-6)
    assert graphs.captured == [4, 2]
    with pytest.raises(ValueError, match=r"expected an input of shape \[B, 5, 24\].*got \(3, 6, 24\)"):
        g(make_input("tokens", 3, C, tokens=6))


@pytest.mark.rounding
def test_output_copy_or_view():
    head = small_head()
    x1, x2 = make_input("map", 4, C), make_input("map", 4, C)
    kept = cuda_graphed(head, (4,), SAMPLE, graph_backend=FrozenGraphs())
    r1 = kept(x1)
    kept(x2)
    assert_close("copy survives the next call", eager(head, x1), r1, 1e-6)
    graphs = FrozenGraphs()
    view = cuda_graphed(head, (4, 2), SAMPLE, copy_output=False, graph_backend=graphs)
    assert graphs.own_output == [True, True]   # each size's output outside the shared pool (GPU test below)
    r1 = view(x1)
    r2 = view(x2)
    assert r1.data_ptr() == r2.data_ptr()   # the documented trade: the next call overwrites it
    assert_close("view holds the latest call", eager(head, x2), r1, 1e-6)


@pytest.mark.parametrize("backend", ["graphs", "eager"])
def test_bad_inputs_fail_before_running(backend):
    head = small_head()
    graphs = FrozenGraphs() if backend == "graphs" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the eager fallback's notice
        g = cuda_graphed(head, (1, 8), SAMPLE, graph_backend=graphs)
    cases = [
        (make_input("map", 9, C), ValueError, r"batch of 9 is larger than the largest captured batch size 8"),
        (make_input("map", 2, C, dtype=torch.float64), TypeError,
         r"input dtype torch.float64 does not match the captured input dtype torch.float32"),
        (torch.randn(2, C, 4, 4), ValueError, r"expected an input of shape \[B, 24, 3, 3\].*got \(2, 24, 4, 4\)"),
        (torch.randn(2, 9, C), ValueError, r"expected an input of shape \[B, 24, 3, 3\].*got \(2, 9, 24\)"),
        (torch.empty(2, *SAMPLE, device="meta"), ValueError, r"input is on meta but the module was captured on cpu"),
        (torch.randn(*SAMPLE).tolist(), TypeError, r"expects a torch.Tensor, got list"),
    ]
    for x, error, message in cases:
        with pytest.raises(error, match=message):
            g(x)
    assert graphs is None or graphs.replayed == []


def change_in_place(head):
    with torch.no_grad():
        head.decoder.embed_standart.weight.mul_(1.5)


def load_other_weights(head):
    other = randomize_(MLDecoderFast(30, 4, 32, C))
    head.load_state_dict(other.state_dict())


def replace_parameter(head):
    layer = head.decoder.layers[0]
    layer.linear1.weight = nn.Parameter(torch.randn_like(layer.linear1.weight))


def assign_data(head):
    p = head.decoder.duplicate_pooling
    p.data = p.data * 2 + 0.1       # new storage, same object, same version counter


@pytest.mark.rounding
@pytest.mark.parametrize("change", [change_in_place, load_other_weights, replace_parameter, assign_data],
                         ids=["in_place", "load_state_dict", "replaced", "data_assigned"])
def test_weight_change_recaptures(change):
    head = small_head()
    graphs = FrozenGraphs()
    g = cuda_graphed(head, (2, 4), SAMPLE, graph_backend=graphs)
    x = make_input("map", 3, C)
    before = g(x)
    change(head)
    after = g(x)
    assert g.captures == 2 and graphs.captured == [4, 2, 4, 2]
    assert_close("after the change", eager(head, x), after, 1e-6)
    assert (after - before).abs().max() > 1e-3, "the change did not change the logits: test is void"
    g(x)
    assert g.captures == 2, "recaptured without a change"


@pytest.mark.rounding
def test_new_word_vectors_recapture():
    head = small_head(zsl=1)
    g = cuda_graphed(head, (4,), SAMPLE, graph_backend=FrozenGraphs())
    x = make_input("map", 2, C)
    assert g(x).shape == (2, 7)
    head.set_word_vectors(torch.randn(5, 300))
    out = g(x)
    assert out.shape == (2, 5) and g.captures == 2
    assert_close("new classes", eager(head, x), out, 1e-6)


def test_dtype_move_recaptures_for_the_new_dtype():
    head = small_head()
    g = cuda_graphed(head, (4,), SAMPLE, graph_backend=FrozenGraphs())
    g(make_input("map", 2, C))
    head.double()
    with pytest.raises(TypeError,
                       match=r"input dtype torch.float32 does not match the captured input dtype torch.float64"):
        g(make_input("map", 2, C))
    x = make_input("map", 2, C, dtype=torch.float64)
    out = g(x)
    assert out.dtype == torch.float64 and g.captures == 2
    assert_close("fp64", eager(head, x), out, 1e-12)


@pytest.mark.parametrize("change, message", [
    (change_in_place, r"decoder.embed_standart.weight was modified in place"),
    (replace_parameter, r"decoder.layers.0.linear1.weight was replaced"),
    (assign_data, r"decoder.duplicate_pooling has new storage"),
], ids=["in_place", "replaced", "data_assigned"])
def test_on_change_error_refuses(change, message):
    head = small_head()
    graphs = FrozenGraphs()
    g = cuda_graphed(head, (4,), SAMPLE, on_change="error", graph_backend=graphs)
    x = make_input("map", 2, C)
    g(x)
    change(head)
    with pytest.raises(RuntimeError, match=message):
        g(x)
    assert graphs.replayed == [4] and g.captures == 1


def test_training_mode_refused():
    head = small_head()
    graphs = FrozenGraphs()
    g = cuda_graphed(head, (4,), SAMPLE, graph_backend=graphs)
    head.train()
    with pytest.raises(RuntimeError, match="training mode: call module.eval()"):
        g(make_input("map", 2, C))
    with pytest.raises(RuntimeError, match="training mode"):
        cuda_graphed(head, (4,), SAMPLE, graph_backend=graphs)
    head.eval()
    head.decoder.layers[0].dropout.train()
    with pytest.raises(RuntimeError, match=r"decoder.layers.0.dropout is in training mode"):
        cuda_graphed(head, (4,), SAMPLE, graph_backend=graphs)
    assert graphs.replayed == []


def test_bad_arguments():
    head = small_head()
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        cuda_graphed(head, batch_sizes=())
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        cuda_graphed(head, batch_sizes=(0, 4))
    with pytest.raises(ValueError, match="on_change must be 'recapture' or 'error', got 'ignore'"):
        cuda_graphed(head, on_change="ignore")
    with pytest.raises(ValueError, match="autocast_dtype must be None, torch.bfloat16 or torch.float16"):
        cuda_graphed(head, autocast_dtype=torch.float32)
    with pytest.raises(TypeError, match="expects an nn.Module, got function"):
        cuda_graphed(lambda x: x)


def test_module_must_return_one_batched_tensor():
    class Pair(nn.Linear):
        def forward(self, x):
            return super().forward(x), x
    with pytest.raises(TypeError, match="returning one tensor"):
        cuda_graphed(Pair(3, 2).eval(), (2,), (3,), graph_backend=FrozenGraphs())


# bf16 products may run through different GEMM providers per shape (ops/cpu_gemm.py): compare at
# bf16's precision, and check that autocast is on through the output dtype of a bare nn.Linear.
BF16_TOL = 2e-2


@pytest.mark.parametrize("backend", ["graphs", "eager"])
def test_autocast_forward(backend):
    graphs = FrozenGraphs() if backend == "graphs" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the eager fallback's notice
        linear = cuda_graphed(nn.Linear(3, 2).eval(), (4,), (3,), autocast_dtype=torch.bfloat16,
                              graph_backend=graphs)
        head = small_head()
        g = cuda_graphed(head, (4,), SAMPLE, autocast_dtype=torch.bfloat16, graph_backend=graphs)
    assert linear(torch.randn(2, 3)).dtype == torch.bfloat16
    x = make_input("map", 3, C)
    assert_close("bf16 autocast", eager(head, x, torch.bfloat16), g(x), BF16_TOL)


# the eager fallback off CUDA --------------------------------------------------------------------
@pytest.mark.rounding
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_cpu_fallback_equals_eager_and_warns_once(autocast_dtype):
    head = small_head()
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device: running it eagerly"):
        g = cuda_graphed(head, (1, 4), SAMPLE, autocast_dtype=autocast_dtype)
    tol = 1e-6 if autocast_dtype is None else BF16_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in (1, 3, 4):
            x = make_input("map", batch, C)
            assert_close(f"B={batch}", eager(head, x, autocast_dtype), g(x), tol)
        change_in_place(head)           # eager reads the current weights
        x = make_input("map", 2, C)
        assert_close("after a change", eager(head, x, autocast_dtype), g(x), tol)
    assert g.captures == 0


@pytest.mark.rounding
def test_cpu_fallback_on_change_error_does_not_apply():
    head = small_head()
    with pytest.warns(RuntimeWarning):
        g = cuda_graphed(head, (4,), SAMPLE, on_change="error")
    replace_parameter(head)
    x = make_input("map", 2, C)
    assert_close("after a replacement", eager(head, x), g(x), 1e-6)


# the head's capture safety, on fake CUDA tensors ------------------------------------------------
_SYNCING_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


class _FailOnHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        assert name not in _SYNCING_OPS, f"{name} synchronises the host: it cannot be captured"
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # the caches' keys
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("zsl", [0, 1], ids=["plain", "zsl"])
def test_eval_forward_is_capturable(zsl, autocast, monkeypatch):
    """What a capture runs (the eval forward under no_grad, on CUDA tensors) neither synchronises
    the host nor stores anything in the caches while a capture is under way: with the caches
    cleared, the graph computes the eval queries (and any autocast weight casts) itself (what the
    warm-up cached before a capture is read instead: test_capture_reads_valid_cache_entries...).
    Outside a capture the same forward does cache them (the test's control)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(), torch.device("cuda"):
        head = MLDecoderFast(30 if not zsl else 1, 4, 32, C, zsl=zsl).eval()
        if zsl:
            head.set_word_vectors(torch.randn(5, 300))
        x = torch.randn(2, *SAMPLE)
        before = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        try:
            if autocast:   # CUDA autocast turns itself off without a device: force it on
                torch.set_autocast_enabled("cuda", True)
                torch.set_autocast_dtype("cuda", torch.bfloat16)
            with torch.no_grad(), _FailOnHostSync():
                head(x)
                assert "queries" in head.caches.names()
                head.clear_caches()
                monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
                monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
                out = head(x)
        finally:
            torch.set_autocast_enabled("cuda", before[0])
            torch.set_autocast_dtype("cuda", before[1])
    assert head.caches.names() == [], "cached a tensor made during a capture"
    assert out.shape == (2, 5 if zsl else 30) and out.device.type == "cuda"


# real CUDA graphs (GPU) -------------------------------------------------------------------------
def coco_like_head(dtype=torch.float32):
    """The COCO head's shape (80 classes, K = 80, D = 768, C = 2048), input [B, 2048, 7, 7]."""
    return make_pair(80, 80, 768, 2048, dtype=dtype, device="cuda")[1].eval()


@needs_cuda
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_cuda_graphed_matches_eager_cuda(autocast_dtype):
    head = coco_like_head()
    g = cuda_graphed(head, (1, 8, 32), (2048, 7, 7), autocast_dtype=autocast_dtype)
    tol = 1e-4 if autocast_dtype is None else 2e-2
    for batch in (1, 5, 32, 8, 3):
        x = torch.randn(batch, 2048, 7, 7, device="cuda")
        assert_close(f"B={batch}", eager(head, x, autocast_dtype).float(), g(x).float(), tol)
    # what the graphs read stays valid: cleared caches, a train()/eval() round trip, eager calls
    # between replays, then changed weights (a recapture)
    x = torch.randn(5, 2048, 7, 7, device="cuda")
    for step in ("clear_caches", "train_eval", "eager_between"):
        if step == "clear_caches":
            head.clear_caches()
        elif step == "train_eval":
            head.train()
            head.eval()
        else:
            eager(head, torch.randn(3, 2048, 7, 7, device="cuda"), autocast_dtype)
        assert_close(f"after {step}", eager(head, x, autocast_dtype).float(), g(x).float(), tol)
    for change in (change_in_place, replace_parameter, assign_data):
        change(head)
        x = torch.randn(5, 2048, 7, 7, device="cuda")
        assert_close(f"after {change.__name__}", eager(head, x, autocast_dtype).float(), g(x).float(), tol)
    assert g.captures == 4


@needs_cuda
def test_view_outputs_survive_other_sizes_replays_cuda():
    """copy_output=False: a size's returned view is overwritten only by that size's next call. The
    graphs share one pool, captured largest first, so without an output of its own a smaller
    size's output could lie in the larger graph's scratch: replay the largest, then read it."""
    head = coco_like_head()
    g = cuda_graphed(head, (1, 8, 32), (2048, 7, 7), autocast_dtype=torch.bfloat16, copy_output=False)
    x1 = torch.randn(1, 2048, 7, 7, device="cuda")
    want = eager(head, x1, torch.bfloat16).float()
    small = g(x1)
    for batch in (32, 8, 20):
        g(torch.randn(batch, 2048, 7, 7, device="cuda"))
    assert_close("B=1 view after larger replays", want, small.float(), 2e-2)


@needs_cuda
def test_make_graphed_callables_training_cuda():
    """A training step captured with torch.cuda.make_graphed_callables: each replay draws fresh
    dropout masks; with dropout off, two steps (an SGD update between them, read by the graph in
    place) give the eager gradients."""
    x = torch.randn(8, 2048, 7, 7, device="cuda")
    g = torch.randn(8, 80, device="cuda")
    head = coco_like_head().train()
    # (copied before graphing: make_graphed_callables replaces the module's forward)
    clean = disable_dropout_(copy.deepcopy(head))(x).detach()
    graphed = torch.cuda.make_graphed_callables(head, (x,))
    outs = []
    for _ in range(2):
        out = graphed(x)
        (out * g).sum().backward()
        outs.append(out.detach().clone())    # the graph's output buffer: the next replay reuses it
    assert torch.isfinite(outs[0]).all() and torch.isfinite(head.decoder.embed_standart.weight.grad).all()
    assert (outs[0] - outs[1]).abs().max() > 1e-3, "two replays drew the same dropout masks"
    assert min((o - clean).abs().max() for o in outs) > 1e-3, "no dropout in the captured step"

    ref = disable_dropout_(coco_like_head().train())
    head = copy.deepcopy(ref)
    graphed = torch.cuda.make_graphed_callables(head, (x,))
    opt_graphed = torch.optim.SGD(head.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        x = torch.randn(8, 2048, 7, 7, device="cuda")
        (graphed(x) * g).sum().backward()
        (ref(x) * g).sum().backward()
        for (name, p), q in zip(ref.named_parameters(), head.parameters(), strict=True):
            if p.requires_grad:
                assert_close(f"step {step}: grad of {name}", p.grad, q.grad, 1e-4)
        opt_graphed.step(), opt_eager.step()
        opt_graphed.zero_grad(), opt_eager.zero_grad()


@needs_cuda
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_reduce_overhead_cuda(mode):
    """torch.compile(head, mode="reduce-overhead", fullgraph=True): no graph break (fullgraph
    raises on one), CUDA graphs through torch.compile, the eager numbers."""
    torch._dynamo.reset()
    ref = coco_like_head()
    head = copy.deepcopy(ref)
    compiled = torch.compile(head, mode="reduce-overhead", fullgraph=True)
    if mode == "eval":
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            x = torch.randn(4, 2048, 7, 7, device="cuda")
            with torch.no_grad():
                assert_close("eval", ref(x), compiled(x), 1e-4)
        return
    ref.train(), head.train()
    disable_dropout_(ref), disable_dropout_(head)
    for step in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(4, 2048, 7, 7, device="cuda")
        g = torch.randn(4, 80, device="cuda")
        (compiled(x) * g).sum().backward()
        (ref(x) * g).sum().backward()
        for (name, p), q in zip(ref.named_parameters(), head.parameters(), strict=True):
            if p.requires_grad:
                assert_close(f"step {step}: grad of {name}", p.grad, q.grad, 1e-4)
                p.grad = q.grad = None
