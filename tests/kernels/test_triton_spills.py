"""Every Triton kernel compiles for sm_90 without register spills, in every production config.

No GPU is needed: a child process (``python tests/kernels/test_triton_spills.py``, TRITON_INTERPRET=0)
calls the kernels' host functions on CPU tensors at the head's production shapes (D = 768,
8 heads of 96, K = 80 / 100 queries, N = 49 / 196 tokens, COCO and 21K group sizes, dropout on
and off) with each kernel replaced by a recorder, so the constexpr variants are exactly the ones
the wrappers pass. Each recorded launch is then compiled, through Triton's own argument binder
(the specialisation and alignment attributes a real launch gets), for every config of the
kernel's autotune list (a plain kernel: the launch's own num_warps), in bf16 and fp16, with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))``; ``cuobjdump -res-usage`` reads the
registers and the stack frame (spilled bytes) from the cubin. The test fails on any stack use,
naming kernel, config, dtype, variant, registers and bytes.

About 230 compiles, ~100 s of one CPU core. fp32 is not checked: with TF32 off the products are
IEEE fp32 FMA loops that spill in most configs and take minutes to compile.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DTYPES = ("bfloat16", "float16")


def _tool(name: str):
    """A CUDA tool from Triton's nvidia backend (the one it compiles with), else the toolkit."""
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        return None
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    return str(home) if home.exists() else shutil.which(name)


# ------------------------------------------------------------------------------------------------
# Child process: record the launches, compile them, report registers and stack bytes
# ------------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a kernel (``kernel[grid](*args, **kwargs)``) and records its launches."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, _grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.kernel, args, kwargs))
        return launch


def _production_calls(dtype):
    """Call every host function of the kernels at production shapes in ``dtype``."""
    import torch

    from mldecoder_fast.kernels import attention as A
    from mldecoder_fast.kernels import group_fc_decode as G
    from mldecoder_fast.kernels import layer_norm as L
    from mldecoder_fast.kernels._common import dropout_mask

    b, d, h = 64, 768, 8
    seed = torch.tensor([7], dtype=torch.int64)
    off = 2 ** 33 + 4  # a Philox offset past 2^32: the kernels' int64 variant of it

    def r(*shape):
        return torch.randn(*shape).to(dtype)

    for k, n, p in ((80, 196, 0.1), (100, 49, 0.0)):
        q, kv = r(b, k, d), r(b, n, 2 * d)
        o, lse = A.attention_forward(q, kv, seed, off, h, p, dtype)
        A.attention_backward(r(b, k, d), q, kv, o, lse, seed, off, h, p)
        shared_q = r(k, d)
        o, lse = A.attention_forward(shared_q, kv, None, 0, h, 0.0, dtype)
        A.attention_backward(r(b, k, d), shared_q, kv, o, lse, None, 0, h, 0.0)
        A.folded_attention_forward(r(h, k, d), r(b, n, d), r(b, n, d), seed, off, p, dtype)
    w, bias = r(d), r(d)
    for shape, p in (((b, 80, d), 0.1), ((b, 100, d), 0.0)):
        res, x = r(*shape), r(*shape)
        _, mean, rstd = L.ln_forward(res, x, seed, off, p, w, bias, 1e-5)
        L.ln_backward(r(*shape), res, x, seed, off, p, w, mean, rstd, dtype)
        L.ln_backward(r(*shape), res, x, seed, off, p, w, mean, rstd, dtype, input_grads=False)
    for k, g, c, p in ((80, 1, 80, 0.1), (100, 113, 11221, 0.0)):
        hid, wg, bg = r(b, k, d), r(k, d, g), r(c)
        G.group_fc_forward(hid, wg, bg, c, dtype)
        G.group_fc_backward(r(b, c), hid, wg, dtype)
        res, x = r(b, k, d), r(b, k, d)
        _, mean, rstd = G.decode_forward(res, x, seed, off, p, w, bias, 1e-5, wg, bg, c, dtype)
        G.decode_backward(r(b, c), res, x, seed, off, p, w, bias, mean, rstd, wg, dtype)
    dropout_mask(seed, b * h * 100, 196, 0.1, off)  # the tests' mask kernel


def _kernel_modules():
    from mldecoder_fast.kernels import _common, attention, group_fc_decode, layer_norm
    return (_common, attention, group_fc_decode, layer_norm)


def _kernels():
    """{name: (module, kernel)} of every kernel (a module-level ``*_kernel`` object)."""
    return {f"{m.__name__.rsplit('.', 1)[1]}.{attr}": (m, getattr(m, attr))
            for m in _kernel_modules() for attr in dir(m) if attr.endswith("_kernel")}


def _record(dtype):
    launches = []
    kernels = _kernels()
    for name, (module, kernel) in kernels.items():
        setattr(module, name.rsplit(".", 1)[1], _Recorder(kernel, name, launches))
    try:
        _production_calls(dtype)
    finally:
        for name, (module, kernel) in kernels.items():
            setattr(module, name.rsplit(".", 1)[1], kernel)
    return launches


def _res_usage(cubin: bytes, cuobjdump: str, tmp: Path) -> dict:
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    fields = [tok.split(":") for line in out.splitlines() if "REG:" in line for tok in line.split()]
    usage = {key: int(val) for key, val in fields if val.isdigit()}
    return {"regs": usage["REG"], "stack": usage["STACK"], "local": usage.get("LOCAL", 0)}


def _probe():
    """Print one JSON line per compiled (kernel, config, dtype, variant)."""
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    cuobjdump = _tool("cuobjdump")
    print(json.dumps({"kernels": sorted(_kernels())}), flush=True)
    seen = set()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in DTYPES:
            for name, kernel, args, kwargs in _record(getattr(torch, dtype_name)):
                autotuned = isinstance(kernel, Autotuner)
                fn = kernel.fn if autotuned else kernel
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                configs = kernel.configs if autotuned else [None]
                for cfg in configs:
                    kw = {**kwargs, **(cfg.all_kwargs() if cfg else {})}
                    bound, spec, opts = binder(*args, **kw)
                    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound,
                                                                          spec, opts)
                    key = (name, dtype_name, repr(signature), repr(sorted(constexprs.items())),
                           repr(attrs), repr(options))
                    if key in seen:
                        continue
                    seen.add(key)
                    t0 = time.perf_counter()
                    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                              target=target, options=options.__dict__)
                    usage = _res_usage(compiled.asm["cubin"], cuobjdump, Path(tmp))
                    tuned = cfg.kwargs if cfg else {}
                    variant = {fn.arg_names[i]: v for (i,), v in constexprs.items()
                               if fn.params[i].is_constexpr and fn.arg_names[i] not in tuned}
                    print(json.dumps({
                        "kernel": name, "dtype": dtype_name,
                        "config": {**tuned, "num_warps": options.num_warps,
                                   "num_stages": options.num_stages},
                        "config_index": configs.index(cfg), "configs": len(configs),
                        "variant": {k: str(v) for k, v in variant.items()},
                        "seconds": round(time.perf_counter() - t0, 2), **usage}), flush=True)


# ------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------

def _run_probe():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, f"offline compile failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return lines[0]["kernels"], lines[1:]


def _describe(row) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in row["config"].items())
    var = ", ".join(f"{k}={v}" for k, v in row["variant"].items())
    return (f"{row['kernel']} [{cfg}] {row['dtype']} ({var}): {row['regs']} registers, "
            f"{row['stack']} bytes stack")


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.skipif(_tool("ptxas") is None or _tool("cuobjdump") is None,
                    reason="needs the CUDA toolkit's ptxas and cuobjdump (Triton's nvidia backend "
                           "or CUDA_HOME) to compile for sm_90")
def test_no_register_spills_sm90():
    kernels, rows = _run_probe()
    # Coverage: every kernel, every config of its autotune list, every dtype was compiled.
    for name in kernels:
        for dtype in DTYPES:
            mine = [r for r in rows if r["kernel"] == name and r["dtype"] == dtype]
            assert mine, f"{name} was not launched by the production calls in {dtype}"
            assert {r["config_index"] for r in mine} == set(range(mine[0]["configs"])), \
                f"{name} {dtype}: not every autotune config compiled"
    spilled = [_describe(r) for r in rows if r["stack"] or r["local"]]
    assert not spilled, f"{len(spilled)} of {len(rows)} compiled kernels spill:\n" + "\n".join(spilled)


if __name__ == "__main__":
    _probe()
