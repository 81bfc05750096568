"""One benchmark per (configuration, mode, device, batch, implementation); the cases are generated
in conftest.py (``pytest_generate_tests``)."""
from __future__ import annotations

import torch

from mldecoder_fast.benchmark.agreement import check_agreement, set_expectations
from mldecoder_fast.benchmark.cases import make_case, make_step, prepare
from mldecoder_fast.benchmark.contenders import reference_impl
from mldecoder_fast.benchmark.timing import peak_memory_bytes, synchronize

_CASE_CACHE: dict = {}


def _case(key, dtype=torch.float32):
    """The shared inputs and expectations (float64 reference, bounds) of a case (kept for its
    implementations only)."""
    cfg, mode, device, batch = key
    ck = (cfg.name, mode, device, batch)
    if ck not in _CASE_CACHE:
        _CASE_CACHE.clear()
        case = make_case(cfg, mode, device, dtype, batch)
        set_expectations(case, prepare(reference_impl(), case))
        _CASE_CACHE[ck] = case
    return _CASE_CACHE[ck]


def test_head(benchmark, settings, case_key, impl):
    cfg, mode, device, batch = case_key
    case = _case(case_key)
    model = prepare(impl, case)
    verdict = check_agreement(model, case, nonfinite_must_match=impl.must_keep_nan)
    assert verdict.ok, f"{impl.name} disagrees with the reference on {cfg.name} {mode} b{batch}: {verdict.detail}"
    step = make_step(model, case)
    dev = torch.device(device)

    def timed():
        step()
        synchronize(dev)

    benchmark.group = f"{cfg.name} | {mode} | {device} | batch {batch}"
    benchmark.extra_info.update(config=cfg.name, mode=mode, device=device, batch=batch, impl=impl.name,
                                max_rel_rms_error_vs_fp64=verdict.error)
    benchmark.pedantic(timed, rounds=settings["rounds"], iterations=1,
                       warmup_rounds=max(settings["warmup"], 1 if impl.compiled else 0))
    # (ONNX Runtime allocates outside PyTorch's allocator: no peak to report.)
    benchmark.extra_info["peak_bytes"] = peak_memory_bytes(step, dev) if impl.memory else None
