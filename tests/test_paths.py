"""The choice of path (mldecoder_fast/paths/route.py): every fact it depends on changes it where it
should, it is made once per distinct facts, and docs/design.md's table from (backend, device, mode,
dtype) to the path and its file is what the resolver does. CUDA heads are fake CUDA tensors (no GPU
needed: the choice reads devices, dtypes and settings, never values)."""
from __future__ import annotations

import contextlib
import inspect
import itertools
import pathlib
import re

import pytest
import torch
from heads import make_pair

from mldecoder_fast import MLDecoderFast, paths
from mldecoder_fast.benchmark.launches import fake_cuda
from mldecoder_fast.head.backends import ops_for
from mldecoder_fast.ops import cpu_gemm

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = {"fp32": (torch.float32, None), "fp64": (torch.float64, None), "fp16": (torch.float16, None),
          "bf16": (torch.bfloat16, None), "bf16 autocast": (torch.float32, torch.bfloat16),
          "fp16 autocast": (torch.float32, torch.float16)}
MODES = ("eval", "eval with autograd", "train")
# (backend that runs, device): the triton backend runs on the CPU in Triton's interpreter only
BACKEND_DEVICES = (("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu"), ("torch", "cuda"), ("cuda", "cuda"),
                   ("triton", "cuda"))


def _head(dtype: torch.dtype, decoder_embedding: int = 64, zsl: int = 0):
    """A head made in ``dtype`` on the default device (fake CUDA tensors cannot change dtype)."""
    was = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        head = MLDecoderFast(20 if not zsl else 1, 4, decoder_embedding, 24, zsl)
    finally:
        torch.set_default_dtype(was)
    if zsl:
        head.set_word_vectors(torch.randn(7, 300, dtype=dtype))
    return head


@contextlib.contextmanager
def _on(device: str):
    """Fake CUDA tensors for "cuda", and the triton backend's ops as they are there: Triton's
    interpreter on the CPU (this suite sets TRITON_INTERPRET), compiled kernels on CUDA."""
    triton = ops_for("triton")
    was = triton._interpret
    triton._interpret = device == "cpu"
    try:
        with fake_cuda(None) if device == "cuda" else contextlib.nullcontext():
            yield
    finally:
        triton._interpret = was


@contextlib.contextmanager
def _autocast(device: str, dtype):
    """Autocast in ``dtype`` on ``device`` (None: off); set directly, as torch.autocast turns
    itself off for CUDA on a machine without a GPU."""
    was = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, dtype is not None)
    if dtype is not None:
        torch.set_autocast_dtype(device, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device, was[0])
        torch.set_autocast_dtype(device, was[1])


def _choice(head, x, mode: str, autocast, backend: str | None = None):
    """(path, derived plan) for one forward, with the facts as the head's forward gathers them
    (``backend``: the backend that runs, where this machine cannot run it)."""
    head.train(mode == "train")
    x = x.requires_grad_(mode == "eval with autograd")
    grad = torch.enable_grad() if mode != "eval" else torch.no_grad()
    with grad, _autocast(x.device.type, autocast):
        facts = paths.facts_of(head, x)
        if backend is not None:
            facts = facts._replace(backend=backend)
        path = paths.choose(head, x, facts)
        return path, facts, path.derive(head, x, facts)


def _resolved(backend: str, device: str, mode: str, dtype: str):
    param_dtype, autocast = DTYPES[dtype]
    with _on(device):
        head = _head(param_dtype)
        x = torch.randn(2, 24, 3, 3, dtype=param_dtype)
        return _choice(head, x, mode, autocast, backend)[0]


# ---- each fact changes the choice ---------------------------------------------------------------

def test_backend_and_the_lean_eval_device():
    head = _head(torch.float32)
    x = torch.randn(2, 24, 3, 3)
    assert _choice(head, x, "eval", None)[0] is paths.CPU_EVAL
    assert _choice(head, x, "eval", None, backend="cpp")[0] is paths.OP_BY_OP
    head.lean_eval_devices = ("cpu",)
    assert _choice(head, x, "eval", None)[0] is paths.LEAN_EVAL
    assert _choice(head, x, "eval", None, backend="cpp")[0] is paths.OP_BY_OP


def test_the_cpu_gemm_choice():
    head = _head(torch.float32)
    x = torch.randn(2, 24, 3, 3)
    previous = cpu_gemm.set_cpu_gemm("mkl")
    try:
        assert _choice(head, x, "eval", None)[0] is paths.OP_BY_OP
    finally:
        cpu_gemm.set_cpu_gemm(previous)
    assert _choice(head, x, "eval", None)[0] is paths.CPU_EVAL


def test_device_and_the_lean_train_device():
    head = _head(torch.float32)
    x = torch.randn(2, 24, 3, 3)
    assert _choice(head, x, "train", None)[0] is paths.CPU_STEP
    head.lean_train_devices = ("cpu",)
    assert _choice(head, x, "train", None)[0] is paths.CUDA_STEP
    with fake_cuda(None):
        head, x = _head(torch.float32), torch.randn(2, 24, 3, 3)
        assert _choice(head, x, "train", None)[0] is paths.CUDA_STEP


def test_mode_grad_and_empty_batch():
    head = _head(torch.float32)
    x = torch.randn(2, 24, 3, 3)
    assert _choice(head, x, "train", None)[0] is paths.CPU_STEP
    assert _choice(head, x, "eval", None)[0] is paths.CPU_EVAL
    assert _choice(head, x[:0], "eval", None)[0] is paths.OP_BY_OP
    head.train()
    with torch.no_grad():
        assert paths.choose(head, x, paths.facts_of(head, x)) is paths.OP_BY_OP
    assert _choice(head, x[:0], "train", None)[0] is paths.OP_BY_OP
    head.lean_eval_devices = ("cpu",)
    assert _choice(head, x, "eval", None)[0] is paths.LEAN_EVAL
    assert _choice(head, x, "eval with autograd", None)[0] is paths.OP_BY_OP


@pytest.mark.parametrize("param_dtype,autocast,input_dtype,expected", [
    (torch.float32, None, torch.float32, paths.CPU_STEP),
    (torch.float64, None, torch.float64, paths.CPU_STEP),
    (torch.float16, None, torch.float16, paths.OP_BY_OP),           # low-precision parameters
    (torch.float32, torch.bfloat16, torch.float32, paths.CPU_STEP),
    (torch.float32, torch.bfloat16, torch.bfloat16, paths.CPU_STEP),  # a backbone's bf16 output
    (torch.float32, torch.bfloat16, torch.float16, paths.OP_BY_OP),   # another input dtype
    (torch.float32, torch.float16, torch.float32, paths.OP_BY_OP),    # the CPU kit's products: bf16
    (torch.float64, torch.bfloat16, torch.float64, paths.OP_BY_OP),   # autocast leaves fp64 alone
])
def test_dtypes(param_dtype, autocast, input_dtype, expected):
    head = _head(param_dtype)
    x = torch.randn(2, 24, 3, 3, dtype=input_dtype)
    assert _choice(head, x, "train", autocast)[0] is expected


def test_mixed_parameter_dtypes_run_op_by_op():
    head = _head(torch.float32)
    x = torch.randn(2, 24, 3, 3)
    assert _choice(head, x, "train", None)[0] is paths.CPU_STEP
    head.decoder.layers[0].norm3.double()     # nn.Module._apply: the kept choices are forgotten
    assert _choice(head, x, "train", None)[0] is paths.OP_BY_OP


def test_train_steping_switch():
    head = _head(torch.float32)
    x = torch.randn(2, 24, 3, 3)
    assert _choice(head, x, "train", None)[0] is paths.CPU_STEP
    head.fused_training = False
    assert _choice(head, x, "train", None)[0] is paths.OP_BY_OP


def test_tracing_runs_op_by_op():
    head = _head(torch.float64).train()
    x = torch.randn(2, 24, 3, 3, dtype=torch.float64)
    chosen = []

    def loss(x):
        chosen.append(paths.choose(head, x, paths.facts_of(head, x)))
        return head(x).sum()
    torch.func.grad(loss)(x)
    assert chosen == [paths.OP_BY_OP]
    assert paths.choose(head, x, paths.facts_of(head, x)) is paths.CPU_STEP


def test_dropout_rates_choose_the_lean_kits_attention():
    """On the CPU the lean kit's fused attention (the flash kernel) has no dropout."""
    head = _head(torch.float32)
    head.lean_train_devices = ("cpu",)
    x = torch.randn(2, 24, 3, 3)
    path, _, plan = _choice(head, x, "train", None)
    assert (path, plan.kit.attention) == (paths.CUDA_STEP, "explicit")
    head.decoder.layers[0].multihead_attn.dropout = 0.0
    path, _, plan = _choice(head, x, "train", None)
    assert (path, plan.kit.attention) == (paths.CUDA_STEP, "fused")


@pytest.mark.parametrize("decoder_embedding,attention", [(64, "fused"), (40, "explicit"), (200, "explicit")])
def test_head_dim_and_the_sdp_setting_choose_the_cuda_kits_attention(decoder_embedding, attention):
    """CUDA's memory-efficient attention takes bf16 heads whose dim is a multiple of 8 (head dims
    8, 5, 25 here), and only while it is enabled."""
    with fake_cuda(None):
        head, x = _head(torch.float32, decoder_embedding), torch.randn(2, 24, 3, 3)
        path, _, plan = _choice(head, x, "train", torch.bfloat16)
        assert (path, plan.kit.attention) == (paths.CUDA_STEP, attention)
        with _no_mem_efficient_sdp():
            path, _, plan = _choice(head, x, "train", torch.bfloat16)
        assert (path, plan.kit.attention) == (paths.CUDA_STEP, "explicit")


@contextlib.contextmanager
def _no_mem_efficient_sdp():
    was = torch.backends.cuda.mem_efficient_sdp_enabled()
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(was)


@pytest.mark.parametrize("zsl,extension_group_fc", [(0, True), (1, False)])
def test_zsl_and_the_cpp_backends_group_fc(zsl, extension_group_fc):
    """The cpp backend's step takes the extension's group FC; a ZSL head's one shared projection
    is a plain product."""
    head = _head(torch.float32, zsl=zsl)
    x = torch.randn(2, 24, 3, 3)
    path, _, plan = _choice(head, x, "train", None, backend="cpp")
    assert (path, plan.extension_group_fc) == (paths.CPU_STEP, extension_group_fc)


def test_the_triton_steps_domain():
    """The triton backend's step on CUDA in fp32 and under bf16/fp16 autocast at head dims up to
    256; op by op in fp64 (the kernels' dtypes) and above 256."""
    assert _resolved("triton", "cuda", "train", "fp32") is paths.TRITON_STEP
    assert _resolved("triton", "cuda", "train", "fp16 autocast") is paths.TRITON_STEP
    assert _resolved("triton", "cuda", "train", "fp64") is paths.OP_BY_OP
    with _on("cuda"):
        head, x = _head(torch.float32, 8 * 264), torch.randn(2, 24, 3, 3)
        assert _choice(head, x, "train", None, backend="triton")[0] is paths.OP_BY_OP


# ---- made once per distinct facts ---------------------------------------------------------------

def test_the_choice_is_kept_per_facts_and_forgotten_on_moves(monkeypatch):
    calls = []
    for path in paths.PATHS:
        applies = path.applies
        monkeypatch.setattr(path, "applies", lambda *a, f=applies, p=path: calls.append(p) or f(*a))
    _, fast = make_pair(20, 4)
    x = torch.randn(2, 24, 3, 3)
    fast.train()
    fast(x)
    first = len(calls)
    assert first > 0
    fast(x)
    fast(torch.randn(3, 24, 2, 2))    # other shapes, same facts
    assert len(calls) == first
    fast.eval()
    with torch.no_grad():
        fast(x)
    assert len(calls) > first
    assert set(fast.chosen_paths.values()) == {paths.CPU_STEP, paths.CPU_EVAL}
    fast.to(torch.float64)
    assert fast.chosen_paths == {}
    fast.train()(x.double())
    fast.clear_caches()
    assert fast.chosen_paths == {}


# ---- docs/design.md's table -----------------------------------------------------------------------

def _design_table() -> list[tuple[list, list, list, list, str, str]]:
    """Rows of the table under "## Paths": (backends, devices, modes, dtypes, path, file), each
    of the first four a list of the values the cell names (comma-separated)."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("\n## Paths\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] in ("backend", "") or set(cells[0]) <= set("-: "):
            continue
        split = [[v.strip() for v in c.split(",")] for c in cells[:4]]
        path = re.sub(r"[`*]", "", cells[4])
        file = re.sub(r"[`*]", "", cells[5])
        rows.append((*split, path, file))
    return rows


def test_the_design_table_covers_every_case_once():
    rows = _design_table()
    assert rows, "docs/design.md has no table under '## Paths'"
    cases = [case for b, dv, m, dt, _, _ in rows for case in itertools.product(b, dv, m, dt)]
    for case in cases:
        backend, device, mode, dtype = case
        assert (backend, device) in BACKEND_DEVICES and mode in MODES and dtype in DTYPES, case
    wanted = [(b, dv, m, dt) for (b, dv) in BACKEND_DEVICES for m in MODES for dt in DTYPES]
    assert sorted(cases) == sorted(wanted), "each (backend, device, mode, dtype) in exactly one row"


@pytest.mark.parametrize("row", _design_table(), ids=lambda r: f"{'/'.join(r[0])}-{'/'.join(r[1])}-{r[4]}")
def test_the_design_table_is_what_the_resolver_does(row):
    backends, devices, modes, dtypes, name, file = row
    path = getattr(paths, name)
    assert inspect.getfile(type(path)).endswith(file), f"{name} lives in {inspect.getfile(type(path))}"
    for case in itertools.product(backends, devices, modes, dtypes):
        param_dtype, autocast = DTYPES[case[3]]
        if path is paths.CPU_EVAL and not cpu_gemm.runs_onednn(autocast or param_dtype):
            assert _resolved(*case) is paths.OP_BY_OP, case   # (the table's note: bf16 on a CPU without it)
        else:
            assert _resolved(*case) is path, case


def test_auto_resolves_per_device_and_mode(monkeypatch):
    """``auto`` is set per (device, mode): an entry for CPU training changes what training runs
    and not eval."""
    from mldecoder_fast.head import backends
    if not backends.backends()["cpp"]["available"]:
        pytest.skip("the compiled extension is not built here")
    monkeypatch.setattr(backends, "AUTO", {**backends.AUTO, ("cpu", "train"): "cpp"})
    monkeypatch.setattr(backends, "_selected", {})
    head = _head(torch.float32)
    x = torch.randn(2, 24, 3, 3)
    assert _choice(head, x, "eval", None)[1].backend == "torch"
    path, facts, plan = _choice(head, x, "train", None)
    assert (path, facts.backend, plan.extension_group_fc) == (paths.CPU_STEP, "cpp", True)
