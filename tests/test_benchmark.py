"""The benchmark code itself (mldecoder_fast.benchmark, ``mldecoder-fast bench``), on tiny shapes.

Checks that the table, JSON, markdown and PNG come out well-formed, that the agreement check
catches an implementation made wrong on purpose (outputs or gradients) and bounds each tensor by
the reference's own error against float64, that the roofline takes the fastest GEMM rate, that
the ONNX Runtime row runs and agrees, that the eager-expert head computes what the reference
computes, and that the FLOP formula counts the head's GEMMs.
"""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from helpers import NO_EXT, assert_close
from torch import nn

from mldecoder_fast import MLDecoder, MLDecoderFast
from mldecoder_fast.benchmark import agreement, cases, contenders, goals, report, runner, tables, timing
from mldecoder_fast.benchmark import configs as configs_mod
from mldecoder_fast.benchmark.configs import BenchConfig
from mldecoder_fast.benchmark.expert import ExpertMLDecoder
from mldecoder_fast.benchmark.flops import forward_flops, step_flops
from mldecoder_fast.benchmark.timing import CPU_PROBE_SHAPES, matmul_probes, peak_memory_bytes, time_interleaved
from mldecoder_fast.cli import main

TINY = BenchConfig("tiny", num_features=24, num_tokens=9, num_classes=14, num_of_groups=4,
                   decoder_embedding=16)
TINY_TOKENS = BenchConfig("tiny-tokens", 20, 5, 7, input_kind="tokens", decoder_embedding=16)
TINY_ZSL = BenchConfig("tiny-zsl", 24, 4, 6, zsl=True, zsl_eval_classes=3, decoder_embedding=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add synchronisation
    yield
    torch.set_num_threads(saved)


def _baselines():
    return [contenders.Impl(contenders.REFERENCE, lambda c: c.make_head(MLDecoder)),
            contenders.Impl(contenders.EXPERT, lambda c: c.make_head(ExpertMLDecoder))]


class _Scaled(ExpertMLDecoder):
    """The eager-expert with its logits off by 1%: a fast but wrong implementation."""

    def forward(self, x):
        return super().forward(x) * 1.01


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.5


class _WrongBackward(ExpertMLDecoder):
    """Right outputs, wrong gradients (the backward of the logits is scaled)."""

    def forward(self, x):
        return _ScaleGrad.apply(super().forward(x))


class _Fp32Expert(ExpertMLDecoder):
    """The eager-expert computing in fp32 whatever the autocast: more accurate than the reference
    under bf16 autocast, so far from the bf16 reference yet close to float64."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


# -- the eager-expert ----------------------------------------------------------------------------

def _pair(cfg):
    torch.manual_seed(0)
    ref = cfg.make_head(MLDecoder)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    exp = cfg.make_head(ExpertMLDecoder)
    exp.load_state_dict(ref.state_dict())
    return ref, exp


@pytest.mark.parametrize("cfg", [TINY, TINY_TOKENS, TINY_ZSL,
                                 BenchConfig("odd-7", 12, 4, 7, decoder_embedding=16),
                                 BenchConfig("odd-101", 12, 4, 101, num_of_groups=10, decoder_embedding=16)],
                         ids=lambda c: c.name)
def test_expert_matches_reference(cfg):
    ref, exp = _pair(cfg)
    assert set(ref.state_dict()) == set(exp.state_dict())
    for mode in ("eval", "train"):
        if cfg.zsl:
            v = cfg.word_vectors(mode)
            ref.set_word_vectors(v)
            exp.set_word_vectors(v)
        x = cfg.make_input(3, "cpu", torch.float32)
        if mode == "eval":
            ref.eval(), exp.eval()
            with torch.no_grad():
                assert_close(f"{cfg.name} eval logits", ref(x), exp(x), 1e-5)
            continue
        ref.train(), exp.train()
        xr, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with cases.dropout_disabled(ref), cases.dropout_disabled(exp):
            out_r, out_e = ref(xr), exp(xe)
            assert_close(f"{cfg.name} train logits", out_r, out_e, 1e-5)
            g = torch.randn_like(out_r)
            (out_r * g).sum().backward()
            (out_e * g).sum().backward()
        assert_close("input grad", xr.grad, xe.grad, 1e-5)
        pe = dict(exp.named_parameters())
        for name, p in ref.named_parameters():
            if p.requires_grad:
                assert_close(f"grad {name}", p.grad, pe[name].grad, 1e-4)


def test_dropout_disabled_restores_rates():
    _, exp = _pair(TINY)
    with cases.dropout_disabled(exp):
        assert all(m.p == 0 for m in exp.modules() if isinstance(m, nn.Dropout))
        assert exp.decoder.layers[0].multihead_attn.dropout == 0
    assert all(m.p == 0.1 for m in exp.modules() if isinstance(m, nn.Dropout))
    assert exp.decoder.layers[0].multihead_attn.dropout == 0.1


# -- the agreement check -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eval", "train"])
def test_agreement_check_catches_wrong_outputs(mode):
    case = cases.make_case(TINY, mode, "cpu", torch.float32, 2)
    impls = _baselines() + [contenders.Impl("wrong", lambda c: c.make_head(_Scaled))]
    rows = runner.run_case(case, impls, warmup=0, repeats=1, measure_memory=False)
    by = {r.impl: r for r in rows}
    assert by[contenders.EXPERT].agree is True
    assert by["wrong"].agree is False and "logits" in by["wrong"].detail
    assert "MISMATCH" in tables.format_table(rows)
    with pytest.raises(agreement.AgreementError, match="wrong"):
        runner.run_case(cases.make_case(TINY, mode, "cpu", torch.float32, 2), impls, warmup=0,
                        repeats=1, measure_memory=False, strict=True)


def test_agreement_check_catches_wrong_gradients():
    case = cases.make_case(TINY, "train", "cpu", torch.float32, 2)
    impls = _baselines() + [contenders.Impl("wrong-bwd", lambda c: c.make_head(_WrongBackward))]
    rows = runner.run_case(case, impls, warmup=0, repeats=1, measure_memory=False)
    bad = {r.impl: r for r in rows}["wrong-bwd"]
    assert bad.agree is False
    assert "grad:" in bad.detail and "logits" not in bad.detail


class _HidesNaN(ExpertMLDecoder):
    """Right numbers on finite inputs; a NaN in a sample's features gives finite logits."""

    def forward(self, x):
        return super().forward(torch.nan_to_num(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_agreement_check_feeds_a_nan_sample(mode):
    """A row of the head that hides a NaN sample fails the check; a peer runtime that does is
    reported only; the reference and the eager-expert keep it in that sample's logits."""
    case = cases.make_case(TINY, mode, "cpu", torch.float32, 3)
    impls = _baselines() + [contenders.Impl("fast-hides-nan", lambda c: c.make_head(_HidesNaN), backend="torch"),
                            contenders.Impl("peer-hides-nan", lambda c: c.make_head(_HidesNaN))]
    rows = {r.impl: r for r in runner.run_case(case, impls, warmup=0, repeats=1, measure_memory=False)}
    assert case.nonfinite[0].all() and not case.nonfinite[1:].any()
    for name in (contenders.REFERENCE, contenders.EXPERT):
        assert rows[name].agree and rows[name].detail == "", (name, rows[name].detail)
    assert rows["fast-hides-nan"].agree is False and "a NaN in sample 0" in rows["fast-hides-nan"].detail
    peer = rows["peer-hides-nan"]
    assert peer.agree is True and "a NaN in sample 0" in peer.detail and "reported, not judged" in peer.detail


def test_bounds_follow_the_reference_error_per_tensor():
    g = torch.Generator().manual_seed(0)

    def off_by(x, rel):  # x plus noise of relative RMS ``rel``
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x + rel * x.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() * noise

    exact = {"logits": torch.randn(64, generator=g, dtype=torch.float64),
             "grad:w": torch.randn(64, generator=g, dtype=torch.float64)}
    # The bf16 reference: logits 0.1% off (below the floor), the gradient 30% off.
    reference = {"logits": off_by(exact["logits"], 1e-3), "grad:w": off_by(exact["grad:w"], 0.3)}
    ref_errors, allowed = agreement.error_bounds(exact, reference, torch.bfloat16)
    assert ref_errors["grad:w"] == pytest.approx(0.3, rel=1e-6)
    assert allowed == {"logits": agreement.ERROR_FLOOR[torch.bfloat16][0], "grad:w": pytest.approx(0.6, rel=1e-6)}

    case = cases.make_case(TINY, "train", "cpu", torch.bfloat16, 2)
    case.exact, case.reference_errors, case.allowed = exact, ref_errors, allowed
    like_reference = {"logits": off_by(exact["logits"], 0.01), "grad:w": off_by(exact["grad:w"], 0.45)}
    assert agreement.judge(case, like_reference).ok
    too_far = {"logits": off_by(exact["logits"], 0.01), "grad:w": off_by(exact["grad:w"], 0.7)}
    verdict = agreement.judge(case, too_far)
    assert not verdict.ok and verdict.detail.startswith("grad:w") and "logits" not in verdict.detail
    assert verdict.errors["grad:w"] == pytest.approx(0.7, rel=1e-6)


def test_low_precision_rows_are_judged_against_float64():
    """bf16 ZSL training (the quick bench's shape, where the bf16 reference's LayerNorm gradients
    are tens of % off float64): an implementation more accurate than the reference (fp32
    throughout) agrees; one with gradients 1.5x off does not."""
    case = cases.make_case(configs_mod.select("zsl", quick=True)[0], "train", "cpu", torch.bfloat16, 16)
    impls = _baselines() + [contenders.Impl("fp32", lambda c: c.make_head(_Fp32Expert)),
                            contenders.Impl("wrong-bwd", lambda c: c.make_head(_WrongBackward))]
    rows = {r.impl: r for r in runner.run_case(case, impls, warmup=0, repeats=1, measure_memory=False)}
    for name in (contenders.REFERENCE, contenders.EXPERT, "fp32"):
        assert rows[name].agree, (name, rows[name].detail)
    assert rows["wrong-bwd"].agree is False and "grad:" in rows["wrong-bwd"].detail
    ref, accurate = rows[contenders.REFERENCE], rows["fp32"]
    assert set(ref.errors) == set(ref.allowed) and len(ref.errors) > 10  # logits, input and every parameter
    assert ref.allowed == accurate.allowed
    # Far closer to float64 than the bf16 reference on some gradient, hence far from the reference
    # itself: a check against the bf16 reference with a fixed 10% faulted it.
    assert max(ref.errors[k] - accurate.errors[k] for k in ref.errors) > 0.1


def test_fp32_rows_keep_a_tight_bound():
    case = cases.make_case(TINY, "train", "cpu", torch.float32, 2)
    rows = {r.impl: r for r in runner.run_case(case, _baselines(), warmup=0, repeats=1, measure_memory=False)}
    for r in rows.values():
        assert r.agree and r.error < 1e-5
        assert r.allowed["logits"] == agreement.ERROR_FLOOR[torch.float32][0]
        assert r.allowed["grad:input"] == agreement.ERROR_FLOOR[torch.float32][1]


# -- the roofline --------------------------------------------------------------------------------

def test_roofline_uses_the_fastest_gemm_rate():
    row = runner.Result("c", "eval", "x", "cpu", "float32", 1, flops=1e9, median_ms=10.0,
                        matmul_rates={"torch.mm": 1e11, "onednn": 4e11})
    fallback = runner.Result("c", "eval", "y", "cpu", "float32", 1, flops=1e9, median_ms=10.0)
    runner.fill_ratios([row, fallback], mm_rate=2e11)
    assert row.matmul_flops_per_s == 4e11 and row.roofline == pytest.approx(0.25)
    assert fallback.matmul_flops_per_s == 2e11 and fallback.roofline == pytest.approx(0.5)


def test_run_case_times_every_gemm_probe():
    def two_ms():
        time.sleep(0.002)
    probes = {"slow": (two_ms, 1e9), "fast": (two_ms, 4e9)}  # same time, 4x the FLOPs
    case = cases.make_case(TINY, "eval", "cpu", torch.float32, 2)
    rows = runner.run_case(case, _baselines(), warmup=0, repeats=3, measure_memory=False, probes=probes)
    for r in rows:
        assert set(r.matmul_rates) == {"slow", "fast"}
        assert r.matmul_rates["fast"] > 2 * r.matmul_rates["slow"]
        assert r.matmul_flops_per_s == r.matmul_rates["fast"]
        assert r.roofline == pytest.approx(r.flops / r.matmul_flops_per_s / (r.median_ms * 1e-3))


def test_cpu_gemm_probes():
    """Named by library and shape; each computes its product ([M, K] x [K, N]); the default CPU
    shapes include the head's input projection at batch 16."""
    probes = matmul_probes("cpu", torch.float32, shapes=((64, 32, 16), (8, 8, 8)))
    names = set(probes)
    assert {"torch.mm 64x32x16", "torch.mm 8x8x8"} <= names
    for name, (fn, flops) in probes.items():
        m, k, n = map(int, name.split()[1].split("x"))
        assert fn().shape == (m, n) and flops == 2.0 * m * k * n, name
    if torch.backends.mkldnn.is_available():
        assert names == {"torch.mm 64x32x16", "torch.mm 8x8x8", "onednn 64x32x16", "onednn 8x8x8"}
        (fn_t, _), (fn_o, _) = probes["torch.mm 64x32x16"], probes["onednn 64x32x16"]
        torch.testing.assert_close(fn_o(), fn_t(), rtol=1e-4, atol=1e-4)
        # oneDNN has no float64 inner product: that probe is left out rather than failing.
        assert set(matmul_probes("cpu", torch.float64, shapes=((8, 8, 8),))) == {"torch.mm 8x8x8"}
    assert (3136, 2048, 768) in CPU_PROBE_SHAPES


def test_failing_implementation_is_skipped_not_fatal():
    def broken(cfg):
        raise RuntimeError("cannot build")
    case = cases.make_case(TINY, "eval", "cpu", torch.float32, 2)
    rows = runner.run_case(case, _baselines() + [contenders.Impl("broken", broken)], warmup=0, repeats=1,
                           measure_memory=False)
    bad = {r.impl: r for r in rows}["broken"]
    assert bad.skipped and "cannot build" in bad.detail and bad.median_ms is None


# -- timing, memory, FLOPs -----------------------------------------------------------------------

def test_steady_timing_gives_every_callable_blocks():
    calls = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", warmup=0,
                         repeats=2, steady=True)
    block = timing.ISOLATED_WARMUP + timing.ISOLATED_BLOCK
    assert calls == ["a"] * block + ["b"] * 2 * block + ["a"] * block
    assert t["a"].repeats == t["b"].repeats == 2 * timing.ISOLATED_BLOCK


def test_isolated_callables_are_timed_in_blocks_on_a_settled_machine(monkeypatch):
    """A runtime with threads of its own gets blocks of calls, with the machine idle before and
    after each block and untimed calls at its start; the others one call per round."""
    monkeypatch.setattr(timing, "SETTLE_S", 0.02)
    calls = []
    t = time_interleaved({"a": lambda: calls.append(("a", time.perf_counter())),
                          "peer": lambda: calls.append(("peer", time.perf_counter()))},
                         "cpu", warmup=0, repeats=3, isolated=frozenset({"peer"}))
    assert t["a"].repeats == 3 and t["peer"].repeats == 3 * timing.ISOLATED_BLOCK
    assert [n for n, _ in calls].count("peer") == 3 * (timing.ISOLATED_WARMUP + timing.ISOLATED_BLOCK)
    for (name, at), (nxt, then) in zip(calls[:-1], calls[1:], strict=True):
        if name != nxt:   # a switch to or from the peer's block waits for the machine to settle
            assert then - at >= 0.02, (name, nxt)


def test_interleaved_timing_and_cpu_peak_memory():
    t = time_interleaved({"a": lambda: None, "b": lambda: torch.ones(10)}, "cpu", warmup=1, repeats=3)
    assert set(t) == {"a", "b"} and all(v.repeats == 3 and v.median_ms >= 0 for v in t.values())

    def alloc():
        a = torch.ones(1 << 20)        # 4 MiB
        b = torch.ones(1 << 19)        # + 2 MiB live at once
        del a, b
        torch.ones(1 << 18)
    peak = peak_memory_bytes(alloc, "cpu")
    assert (6 << 20) <= peak < (7 << 20)


def test_held_bytes_count_caches_not_parameters():
    """The bench's peak memory adds what a head keeps between steps: after a bf16 CPU training
    step, MLDecoderFast's weight copies, never its parameters."""
    from mldecoder_fast.benchmark.cases import held_bytes
    ref, _ = _pair(TINY)
    fast = TINY.make_head(MLDecoderFast)
    fast.load_state_dict(ref.state_dict())
    assert held_bytes(ref) == 0 and held_bytes(fast) == 0
    fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(TINY.make_input(3, "cpu", torch.float32)).float().sum().backward()
    copies = sum(p.numel() * 2 for p in fast.parameters() if p.dim() > 1)   # bf16 copies of the matrices
    assert held_bytes(fast) >= copies
    assert held_bytes(fast) < copies + sum(p.numel() * 4 for p in fast.parameters())


@pytest.mark.parametrize("cfg", [TINY, TINY_TOKENS, TINY_ZSL], ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_flop_formula_counts_the_gemms(cfg, mode):
    from torch.utils.flop_counter import FlopCounterMode
    _, exp = _pair(cfg)
    if cfg.zsl:
        exp.set_word_vectors(cfg.word_vectors(mode))
    exp.train(mode == "train")
    x = cfg.make_input(3, "cpu", torch.float32)
    with cases.dropout_disabled(exp), FlopCounterMode(display=False) as counter, torch.no_grad():
        exp(x)
    counted = counter.get_total_flops()
    # FlopCounterMode has no formula for the CPU attention kernel: add the 4BKND attention term.
    if not any("attention" in str(op) for op in counter.get_flop_counts()["Global"]):
        counted += 4 * 3 * cfg.queries_for(mode) * cfg.num_tokens * cfg.decoder_embedding
    assert counted == forward_flops(cfg, 3, mode)
    assert step_flops(cfg, 3, "train") == 3 * forward_flops(cfg, 3, "train")


def test_configs_match_spec_table():
    c = configs_mod.STANDARD_CONFIGS
    assert (c["imagenet21k-resnet50-224"].num_queries, c["imagenet21k-resnet50-224"].group_size) == (100, 219)
    assert (c["openimages-tresnet_m-224"].num_queries, c["openimages-tresnet_m-224"].group_size) == (200, 49)
    assert (c["coco-tresnet_l-448"].num_queries, c["coco-tresnet_l-448"].group_size) == (80, 1)
    assert c["zsl-nus-wide-224"].classes_for("eval") == 81
    assert [x.name for x in configs_mod.select("imagenet21k,vit")] == ["imagenet21k-resnet50-224", "vit-b16-224"]
    with pytest.raises(ValueError, match="unknown"):
        configs_mod.select("nope")


# -- the whole command: table, JSON, markdown, PNG -----------------------------------------------

def test_bench_command_writes_table_json_markdown_png(tmp_path, capsys):
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "s.png"
    status = main(["bench", "--quick", "--configs", "imagenet1k,zsl", "--repeats", "1", "--no-progress",
                   "--json", str(js), "--markdown", str(md), "--plot", str(png), "--scaling-classes", "80,1000",
                   "--threads", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "ms (median)" in out and "x ref" in out and "roofline" in out
    assert "imagenet1k-resnet50-224-tiny" in out and "eager-expert" in out

    data = json.loads(js.read_text())
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "commit", "date", "dtype", "batches", "matmul_tflops"):
        assert key in meta
    assert meta["dtype"] == "float32" and meta["batches"] == [16]
    rows = [r for r in data["results"] if not r["skipped"]]
    assert {r["mode"] for r in rows} == {"eval", "train"}
    for r in rows:
        assert r["median_ms"] > 0 and r["agree"] is True
        assert r["speedup_vs_reference"] > 0 and r["roofline"] > 0
        assert r["errors"] and set(r["errors"]) == set(r["allowed"])
        assert all(r["errors"][k] <= r["allowed"][k] for k in r["errors"])
        assert r["matmul_flops_per_s"] == max(r["matmul_rates"].values())
        assert (r["peak_bytes"] is None) == (r["impl"] in ("onnxruntime", "openvino"))
    for runtime in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(runtime) and importlib.util.find_spec("onnxscript"):
            peer = [r for r in rows if r["impl"] == runtime]
            assert sorted(r["config"] for r in peer) == ["imagenet1k-resnet50-224-tiny", "zsl-nus-wide-224-tiny"]
            assert {r["mode"] for r in peer} == {"eval"}  # inference only
            assert all(len(r["times_ms"]) % timing.ISOLATED_BLOCK == 0 for r in peer)   # timed in blocks
            assert meta[runtime] and meta["onnx"]
        else:
            assert runtime in data["skipped"]
    assert set(meta["matmul_gflops"]) >= {f"torch.mm {m}x{k}x{n}" for m, k, n in CPU_PROBE_SHAPES}
    assert meta["cpu"]["model"] and "aten_capability" in meta["cpu"]   # the CPU named in every record
    assert "- CPU: " in md.read_text()
    assert {r["classes"] for r in data["scaling"]} == {80, 1000}
    scaled = {r["impl"] for r in data["scaling"] if not r["skipped"]}
    assert {"reference", "eager-expert"} <= scaled and any(n.startswith("fast-") for n in scaled), scaled
    assert meta["auto_backend"] in {"torch", "cpp"}

    text = md.read_text()
    assert text.count("| imagenet1k-resnet50-224-tiny |") >= 4 and "| config |" in text
    assert "Scaling, train" in text
    assert "- peak memory: a step's peak plus what the head holds between steps" in text
    assert md.read_text() == report.to_markdown(data) + "\n"  # markdown is a function of the JSON

    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 600

    # Re-rendering from the JSON needs no measurement and gives the same markdown.
    md2 = tmp_path / "again.md"
    assert main(["bench", "--from-json", str(js), "--markdown", str(md2)]) == 0
    assert md2.read_text() == text

    # BENCHMARKS.md is generated from such records.
    bm = tmp_path / "BENCHMARKS.md"
    assert report.main(["--out", str(bm), "--section", f"CPU tiny={js}={png.name}"]) == 0
    doc = bm.read_text()
    assert doc.startswith("# Benchmarks") and "## CPU tiny" in doc and f"![CPU tiny]({png.name})" in doc
    assert text[:300] in doc  # the section is the record's markdown


def test_bench_command_rejects_unknown_names(capsys):
    assert main(["bench", "--configs", "nope", "--no-progress"]) == 2
    assert main(["bench", "--quick", "--impls", "fastest-ever", "--no-progress"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_jsonl_rows_are_appended_as_each_case_finishes(tmp_path):
    """--jsonl appends each case's rows (with device, torch and commit) as soon as it is measured:
    two cases give two appends; an existing file keeps its lines (a GPU check's stages share one)."""
    import json
    out = tmp_path / "rows.jsonl"
    out.write_text('{"earlier": 1}\n')
    appended = []
    real_open = open

    def spying_open(path, mode="r", *a, **kw):
        if str(path) == str(out) and mode == "a":
            appended.append(1)
        return real_open(path, mode, *a, **kw)
    import builtins
    builtins_open, builtins.open = builtins.open, spying_open
    try:
        assert main(["bench", "--quick", "--configs", "imagenet1k", "--modes", "eval", "--batch", "1,2",
                     "--repeats", "1", "--impls", "reference,fast-torch", "--no-progress", "--no-memory",
                     "--jsonl", str(out)]) == 0
    finally:
        builtins.open = builtins_open
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"earlier": 1} and len(appended) == 2
    rows = lines[1:]
    assert sorted((r["batch"], r["impl"]) for r in rows) == [(1, "fast-torch"), (1, "reference"),
                                                             (2, "fast-torch"), (2, "reference")]
    assert all(r["median_ms"] > 0 and r["agree"] and r["torch"] and r["device_name"] for r in rows)


def test_profile_backends_script(tmp_path, capsys):
    """bench/profile_backends.py (the per-kernel breakdown for GPU sessions) runs and reports."""
    import json

    from helpers import load_bench_script
    mod = load_bench_script("profile_backends")
    out = tmp_path / "p.json"
    assert mod.main(["--device", "cpu", "--config", "imagenet21k", "--quick", "--steps", "2",
                     "--impls", "reference,fast-torch", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["impl"] for r in data["results"]] == ["reference", "fast-torch"]
    for r in data["results"]:
        assert r["busy_ms_per_step"] > 0 and r["top"] and r["top"][0]["ms_per_step"] > 0
    fast_ops = {t["name"] for t in data["results"][1]["top"]}
    assert any("mm" in name for name in fast_ops), fast_ops
    assert "fast-torch" in capsys.readouterr().out


def test_timed_training_step_includes_an_optimizer_step():
    """The timed train step runs AdamW: every trainable parameter moves, frozen ones do not, and
    no gradient is left behind (eval steps leave the weights alone)."""
    case = cases.make_case(TINY, "train", "cpu", torch.float32, 2)
    model = cases.prepare(contenders.reference_impl(), case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cases.make_step(model, case)()
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == p.requires_grad, name
        assert p.grad is None, name
    eval_case = cases.make_case(TINY, "eval", "cpu", torch.float32, 2)
    model = cases.prepare(contenders.reference_impl(), eval_case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cases.make_step(model, eval_case)()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# -- the GPU rows: graphed heads and torch.compile's peers ---------------------------------------

GPU_ROWS = ["graphed-expert", "graphed-fast-torch", "graphed-fast-triton",
            "compiled-expert-max-autotune-no-cudagraphs", "compiled-expert-reduce-overhead",
            "compiled-fast-torch-reduce-overhead", "compiled-fast-triton-reduce-overhead"]


def test_gpu_rows_are_skipped_on_cpu_with_reasons():
    impls, skipped = contenders.implementations("cpu", names=GPU_ROWS + ["fast-torch"], include_compiled=True)
    assert {i.name for i in impls} <= {contenders.REFERENCE, "fast-torch"}
    assert skipped["graphed-*"] == "CUDA graphs need a CUDA device"
    for mode in (contenders.MAX_AUTOTUNE, contenders.REDUCE_OVERHEAD):
        assert "CUDA only" in skipped[f"compiled-*-{mode}"]
    with pytest.raises(ValueError, match="unknown"):
        contenders.implementations("cpu", names=["compiled-expert-max-autotune"], include_compiled=True)


def test_gpu_rows_are_listed_for_cuda():
    """(Listing builds nothing on the device: this runs without a GPU.) Graphed rows by default,
    the compile-mode peers only when named; neither reports a per-step peak when its memory is a
    pool allocated at capture."""
    by = {i.name: i for i in contenders.implementations("cuda", include_compiled=True)[0]}
    assert by["graphed-expert"].wrap is contenders.graphed_head and not by["graphed-expert"].memory
    assert not any(n.startswith("compiled-expert-") for n in by)
    impls, skipped = contenders.implementations("cuda", names=GPU_ROWS, include_compiled=True)
    by = {i.name: i for i in impls}
    assert {"graphed-expert", "compiled-expert-max-autotune-no-cudagraphs",
            "compiled-expert-reduce-overhead"} <= set(by)
    assert by["compiled-expert-max-autotune-no-cudagraphs"].memory
    assert not by["compiled-expert-reduce-overhead"].memory
    for name in GPU_ROWS:   # the fast rows where the backend runs on CUDA, else skipped like it
        base = name.replace("graphed-", "").replace("compiled-", "").replace("-reduce-overhead", "")
        assert name in by or skipped[name] == f"as {base}: {skipped[base]}", name


def _stand_in_compile(calls):
    """torch.compile recording its arguments, compiling with the "eager" backend (no inductor)."""
    real = torch.compile

    def fake(model, **kwargs):
        calls.append(kwargs)
        return real(model, backend="eager", dynamic=kwargs.get("dynamic"))
    return fake


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_mode_peers_run_through_the_agreement_check(mode, monkeypatch):
    """The compile-mode peers of the CUDA listing, run on a CPU case with torch.compile's "eager"
    backend: each asks for its mode with static shapes, a reduce-overhead module starts a new
    CUDA-graph-tree step at every call, and both agree with the reference."""
    calls, steps = [], []
    monkeypatch.setattr(torch, "compile", _stand_in_compile(calls))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    names = ["compiled-expert-max-autotune-no-cudagraphs", "compiled-expert-reduce-overhead"]
    impls, _ = contenders.implementations("cuda", names=names, include_compiled=True)
    case = cases.make_case(TINY, mode, "cpu", torch.float32, 2)
    rows = {r.impl: r for r in runner.run_case(case, impls, warmup=1, repeats=2, measure_memory=False)}
    assert sorted(c["mode"] for c in calls) == ["max-autotune-no-cudagraphs", "reduce-overhead"]
    assert all(c["dynamic"] is False for c in calls)
    for name in names:
        assert rows[name].agree, rows[name].detail
        assert rows[name].median_ms is not None
    # reduce-overhead: the agreement check's two calls (its input, then one with a NaN sample), the
    # warm-up's and the two timed ones (in eval on the CPU: two blocks)
    assert len(steps) == (3 + 2 * (timing.ISOLATED_WARMUP + timing.ISOLATED_BLOCK) if mode == "eval" else 5)


def _frozen_dropout_graphs(captures):
    """A CPU stand-in for torch.cuda.make_graphed_callables: the "graph" keeps the dropout rates
    the module had at capture, as a real one does; records what each capture saw."""
    def make_graphed(module, sample_args):
        rates = [(m, attr, getattr(m, attr)) for m, attr in cases.dropout_sites(module)]
        captures.append({"rates": tuple(r for *_, r in rates),
                         "autocast_cache": torch.is_autocast_cache_enabled(),
                         "autocast": torch.is_autocast_enabled("cpu"),
                         "sample_requires_grad": sample_args[0].requires_grad})

        def replay(x):
            now = [(m, attr, getattr(m, attr)) for m, attr, _ in rates]
            for m, attr, r in rates:
                setattr(m, attr, r)
            try:
                return module(x)
            finally:
                for m, attr, r in now:
                    setattr(m, attr, r)
        return replay
    return make_graphed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_training_row(dtype, monkeypatch):
    """graphed-expert in training, its graphs stood in for on the CPU: one capture for the
    agreement check (every dropout at p = 0) and one for the timed steps (the head's rates), both
    under autocast without its weight cache in a bf16 run; the row agrees and the AdamW step
    reaches the head's parameters."""
    captures = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _frozen_dropout_graphs(captures))
    graphed = {i.name: i for i in contenders.implementations("cuda", names=["graphed-expert"])[0]}["graphed-expert"]
    case = cases.make_case(TINY, "train", "cpu", dtype, 2)
    rows = {r.impl: r for r in runner.run_case(case, [contenders.reference_impl(), graphed], warmup=1, repeats=2,
                                               measure_memory=False)}
    assert rows["graphed-expert"].agree, rows["graphed-expert"].detail
    assert [c["rates"] for c in captures] == [(0.0,) * len(captures[0]["rates"]),
                                              (0.1,) * len(captures[0]["rates"])]
    low = dtype == torch.bfloat16
    assert all(c["autocast"] == low and c["autocast_cache"] is False and c["sample_requires_grad"]
               for c in captures)
    model = cases.prepare(graphed, case)
    before = {n: p.detach().clone() for n, p in cases.unwrapped(model).named_parameters()}
    cases.make_step(model, case)()
    assert all(not torch.equal(before[n], p) for n, p in cases.unwrapped(model).named_parameters()
               if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_eval_row(dtype, monkeypatch):
    """graphed-expert in eval through cuda_graphed, its graphs stood in for on the CPU
    (``FrozenGraphs``): one capture at the case's batch, in the input's dtype under the run's
    autocast; each call copies its input in and returns an output that survives the next call."""
    import functools

    from test_cuda_graphs import FrozenGraphs
    graphs = FrozenGraphs()
    monkeypatch.setattr(contenders, "cuda_graphed", functools.partial(contenders.cuda_graphed, graph_backend=graphs))
    graphed = {i.name: i for i in contenders.implementations("cuda", names=["graphed-expert"])[0]}["graphed-expert"]
    case = cases.make_case(TINY, "eval", "cpu", dtype, 3)
    rows = {r.impl: r for r in runner.run_case(case, [contenders.reference_impl(), graphed], warmup=1, repeats=2,
                                               measure_memory=False)}
    assert rows["graphed-expert"].agree, rows["graphed-expert"].detail
    assert graphs.captured == [3] and len(graphs.replayed) >= 4   # check, warm-up, 2 timed
    wrapped = cases.prepare(graphed, case)
    assert wrapped.autocast_dtype == (dtype if dtype == torch.bfloat16 else None)
    first = wrapped(case.inputs[0])
    kept = first.clone()
    wrapped(TINY.make_input(3, "cpu", dtype, seed=5))
    assert torch.equal(first, kept), "the output was overwritten by the next call"


def test_bench_command_keeps_the_cases_measured_before_an_interruption(tmp_path, monkeypatch, capsys):
    real, calls = cases.make_case, []

    def interrupted_at_the_second_case(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(runner, "make_case", interrupted_at_the_second_case)
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    status = main(["bench", "--quick", "--configs", "imagenet1k", "--modes", "eval", "--batch", "1,2",
                   "--impls", "reference,eager-expert", "--repeats", "1", "--no-progress", "--threads", "1",
                   "--json", str(js), "--markdown", str(md)])
    assert status == 130
    data = json.loads(js.read_text())
    assert data["meta"]["interrupted"] is True
    assert {(r["batch"], r["impl"]) for r in data["results"]} == {(1, "reference"), (1, "eager-expert")}
    assert "interrupted" in md.read_text() and "interrupted" in capsys.readouterr().err


def test_summary_reports_the_cpu_targets():
    """The bench summary judges the CPU targets from the rows of one run: ratios to the expert and
    to ONNX Runtime, the training roofline and the 21K training-step time."""
    def row(cfg, mode, impl, ms, **kw):
        return runner.Result(cfg, mode, impl, "cpu", "float32", 16, median_ms=ms, agree=True, **kw)

    c21k, coco = "imagenet21k-resnet50-224", "coco-tresnet_l-448"
    rows = [row(c21k, "train", contenders.REFERENCE, 1000.0), row(c21k, "train", contenders.EXPERT, 400.0),
            row(c21k, "train", "fast-torch", 200.0, roofline=0.72),
            row(coco, "eval", contenders.REFERENCE, 100.0), row(coco, "eval", contenders.EXPERT, 90.0),
            row(coco, "eval", contenders.ONNXRUNTIME, 60.0), row(coco, "eval", "fast-torch", 50.0)]
    runner.fill_ratios(rows)
    lines = goals.summary(rows, {"device": "cpu", "dtype": "float32", "auto_backend": "torch"})
    train = next(line for line in lines if c21k in line)
    assert "x eager-expert 2 (>= 1.75: met)" in train
    assert "roofline 0.72 (>= 0.7: met)" in train
    assert "ms 200 (<= 190: NOT met)" in train
    evals = next(line for line in lines if coco in line)
    assert "x eager-expert 1.8 (>= 1.8: met)" in evals and "x onnxruntime 1.2 (>= 1: met)" in evals
    # another device or dtype: no targets judged
    lines = goals.summary(rows, {"device": "cpu", "dtype": "bfloat16", "auto_backend": "torch"})
    assert not any("met" in line for line in lines)


def test_training_optimizer_state_exists_before_the_first_timed_step():
    """The optimizer's state is allocated up front (held between steps like the weights, so no
    step's peak memory includes it) and making it changes no weight."""
    head = TINY.make_head(MLDecoder).train()
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    optimizer = cases.training_optimizer(head)
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert all("exp_avg" in optimizer.state[p] for p in trainable)
    assert all(torch.equal(before[n], p) for n, p in head.named_parameters())
    assert all(p.grad is None for p in trainable)
    assert all(g["lr"] > 0 for g in optimizer.param_groups)


@pytest.mark.skipif(NO_EXT, reason="MLDECODER_FAST_NO_EXT=1: installed without the extension")
def test_group_fc_speed_script(tmp_path):
    """bench/group_fc_speed.py (the group FC's providers, timed with the benchmark's interleaved
    timer) runs and writes one row per provider and batch."""
    from helpers import load_bench_script
    script = load_bench_script("group_fc_speed")
    out = tmp_path / "g.json"
    rows = script.main(["--batch", "2", "3", "--classes", "50", "--groups", "5", "--dim", "16", "--reps", "1",
                        "--no-loop", "--json", str(out)])
    assert sorted((r["batch"], r["provider"]) for r in rows) == [(2, "bmm_expr"), (2, "extension"),
                                                                 (3, "bmm_expr"), (3, "extension")]
    assert all(r["ms_fwd_bwd"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
