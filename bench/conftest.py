"""pytest-benchmark suite of the ML-Decoder head: ``pytest bench/``.

Every standard configuration (docs/design.md) x mode (eval forward, training step) x device x batch x implementation,
grouped per (configuration, mode, device, batch) so that pytest-benchmark's table compares the
implementations of one case. Every benchmark first checks its implementation against the
reference (outputs; in training also every gradient) and fails on a mismatch.

Two sizes:
- quick (the default, for CI: ~1 minute on 2 CPU cores): the configurations shrunk ~20x with the
  same structure, CPU batches 1 and 16, 3 rounds, one CPU thread;
- full (``--bench-full`` or ``MLDECODER_BENCH_QUICK=0``): the real configurations, batches 1 and
  16 on the CPU and 1, 32, 256 on CUDA, 5 rounds.
torch.compile of the reference and the eager-expert joins with ``--bench-compiled`` (or
``MLDECODER_BENCH_COMPILED=1``): each compile takes tens of seconds on a CPU.

Saved runs compare across commits: ``pytest bench/ --bench-full --benchmark-save=NAME`` then
``--benchmark-compare``.
"""
from __future__ import annotations

import os

import pytest
import torch

# Triton kernels would run in its CPU interpreter without a GPU; the interpreted backend is left
# out of the timings (see mldecoder_fast.benchmark.contenders.implementations).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _env_flag(name: str):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def pytest_addoption(parser):
    group = parser.getgroup("mldecoder-bench", "ML-Decoder benchmarks (bench/)")
    group.addoption("--bench-full", action="store_true", default=False,
                    help="real standard configurations and more rounds (default: quick, shrunk configurations)")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="force the quick mode (the default unless --bench-full or MLDECODER_BENCH_QUICK=0)")
    group.addoption("--bench-compiled", action="store_true", default=False,
                    help="also benchmark torch.compile of the reference and the eager-expert")
    group.addoption("--bench-configs", default=None, help="comma-separated configuration names or prefixes")


def bench_settings(config) -> dict:
    env_quick = _env_flag("MLDECODER_BENCH_QUICK")
    if config.getoption("--bench-quick"):
        quick = True
    elif config.getoption("--bench-full"):
        quick = False
    else:
        quick = True if env_quick is None else env_quick
    compiled = config.getoption("--bench-compiled") or bool(_env_flag("MLDECODER_BENCH_COMPILED"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    batches = {"cpu": [1, 16], "cuda": [1, 32] if quick else [1, 32, 256]}
    return dict(quick=quick, compiled=compiled, devices=devices, batches=batches,
                rounds=3 if quick else 5, warmup=1,
                configs=config.getoption("--bench-configs"))


def _cases(config):
    from mldecoder_fast.benchmark import configs as configs_mod
    from mldecoder_fast.benchmark.contenders import implementations

    s = bench_settings(config)
    out = []
    for device in s["devices"]:
        impls, skipped = implementations(device, include_compiled=s["compiled"], dtype=torch.float32)
        for cfg in configs_mod.select(s["configs"], quick=s["quick"]):
            for mode in ("eval", "train"):
                for batch in s["batches"][device]:
                    for impl in impls:
                        if mode not in impl.modes:
                            continue
                        out.append(pytest.param((cfg, mode, device, batch), impl,
                                                id=f"{cfg.name}-{mode}-{device}-b{batch}-{impl.name}"))
        # One skipped entry per implementation that cannot run here, with the reason.
        for name, why in skipped.items():
            out.append(pytest.param(None, None, id=f"{device}-{name}", marks=pytest.mark.skip(reason=why)))
    return out


def pytest_generate_tests(metafunc):
    if {"case_key", "impl"} <= set(metafunc.fixturenames):
        metafunc.parametrize("case_key,impl", _cases(metafunc.config))


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a benchmark of bench/")


def pytest_report_header(config):
    s = bench_settings(config)
    return (f"mldecoder bench: {'quick' if s['quick'] else 'full'} mode, devices {s['devices']}, "
            f"compiled {'on' if s['compiled'] else 'off'}")


@pytest.fixture(scope="session")
def settings(request):
    return bench_settings(request.config)


@pytest.fixture(scope="session", autouse=True)
def _threads(settings):
    """Quick mode runs one CPU thread: tiny shapes on a shared 2-core machine otherwise spend
    their time in OpenMP synchronisation, and the run's length becomes unpredictable."""
    saved = torch.get_num_threads()
    if settings["quick"]:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_benchmark_update_machine_info(config, machine_info):
    from mldecoder_fast.benchmark.record import device_name, git_commit, triton_version
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton_version()
    machine_info["cpu_device"] = device_name(torch.device("cpu"))
    if torch.cuda.is_available():
        machine_info["cuda_device"] = device_name(torch.device("cuda"))
    machine_info["mldecoder_commit"] = git_commit()
    machine_info["mldecoder_bench_mode"] = "quick" if bench_settings(config)["quick"] else "full"
