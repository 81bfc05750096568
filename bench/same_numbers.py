"""Proof that a change moved code without changing what it computes: every path of the head, run on
fixed seeds, gives bit-identical outputs, gradients and CUDA op sequences at two commits.

    python bench/same_numbers.py record OUT.pt          # this checkout's numbers
    python bench/same_numbers.py compare A.pt B.pt      # bit for bit, or a list of what differs
    python bench/same_numbers.py against COMMIT         # COMMIT's numbers (a temporary worktree,
                                                        # its own process) against this checkout's

What is recorded, per configuration (80 classes; 1,000 with the default 100 groups; 9,605 in 200
groups, a padded tail; [B, N, C] tokens; ZSL):

- on the CPU, per backend (torch, cpp), GEMM provider (mkl, onednn; ``auto`` times shapes and may
  choose differently from one process to the next) and dtype (fp32, fp64, bf16 autocast): the eval
  logits, and a training step with dropout on (seeded): logits, input gradient and every
  parameter gradient; the same for the CUDA paths run on the CPU (the launch-lean eval forward and
  training kit);
- on fake CUDA tensors (no GPU needed): the ATen op sequence, with shapes and dtypes, of the
  eval forward and of a training step's forward and backward, fp32 and bf16 autocast.

Numbers are bit-identical only on one machine (and one PyTorch): run both commits here, as
``against`` does.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

# (name, classes, groups, input kind, zsl)
CONFIGS = [("coco", 80, -1, "map", 0), ("in1k", 1000, -1, "map", 0), ("openimages", 9605, 200, "map", 0),
           ("tokens", 21, 4, "tokens", 0), ("zsl", 1, -1, "map", 1)]
EMBED, FEATURES, TOKENS, BATCH = 64, 48, 9, 3
DTYPES = {"fp32": (torch.float32, None), "fp64": (torch.float64, None), "bf16": (torch.float32, torch.bfloat16)}


def _head(classes, groups, zsl, backend, dtype, device="cpu"):
    from mldecoder_fast import MLDecoderFast
    torch.manual_seed(0)
    head = MLDecoderFast(classes, groups, EMBED, FEATURES, zsl, backend=backend)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    if device == "cpu":      # (under fake_cuda the head is made on the fake device already)
        head = head.to(dtype=dtype)
    if zsl:
        head.set_word_vectors(torch.randn(7, 300).to(device=device, dtype=dtype))
    return head


def _input(kind, dtype, device="cpu"):
    torch.manual_seed(1)
    shape = (BATCH, TOKENS, FEATURES) if kind == "tokens" else (BATCH, FEATURES, 3, 3)
    return torch.randn(shape).to(device=device, dtype=dtype)


def _cpu_records(out: dict) -> None:
    from mldecoder_fast.ops import cpu_gemm
    backends = ["torch", "cpp"] if _extension_available() else ["torch"]
    for name, classes, groups, kind, zsl in CONFIGS:
        for backend in backends:
            for path in ("default", "lean"):
                if path == "lean" and backend != "torch":
                    continue
                for provider in ("mkl", "onednn"):
                    if path == "lean" and provider == "onednn":
                        continue   # the lean paths use torch's products
                    cpu_gemm.set_cpu_gemm(provider)
                    for dname, (pdt, autocast) in DTYPES.items():
                        key = f"cpu/{name}/{backend}/{path}/{provider}/{dname}"
                        head = _head(classes, groups, zsl, backend, pdt)
                        if path == "lean":
                            head.lean_eval_devices = ("cpu",)
                            head.lean_train_devices = ("cpu",)
                        x = _input(kind, pdt)
                        ctx = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
                        head.eval()
                        with torch.no_grad(), ctx:
                            out[f"{key}/eval"] = head(x)
                        head.train()
                        torch.manual_seed(2)     # the dropout masks
                        xx = x.clone().requires_grad_(True)
                        with ctx:
                            logits = head(xx)
                        g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)).to(logits)
                        (logits * g).sum().backward()
                        out[f"{key}/train/logits"] = logits.detach()
                        out[f"{key}/train/grad:input"] = xx.grad
                        for pname, p in head.named_parameters():
                            if p.grad is not None:
                                out[f"{key}/train/grad:{pname}"] = p.grad
    cpu_gemm.set_cpu_gemm(None)


def _fake_cuda_records(out: dict) -> None:
    from mldecoder_fast.benchmark.launches import count_launches, fake_cuda, run_backward
    for name, classes, groups, kind, zsl in CONFIGS:
        for dname, autocast in (("fp32", None), ("bf16", torch.bfloat16)):
            with fake_cuda(autocast):
                head = _head(classes, groups, zsl, "torch", torch.float32, "cuda")
                x = _input(kind, torch.float32, "cuda")
                head.eval()
                with torch.no_grad():
                    ops = count_launches(lambda h=head, x=x: h(x))
                out[f"fake-cuda/{name}/{dname}/eval"] = [(op.op, op.shapes, op.dtypes) for op in ops]
                head.train()
                ops = count_launches(lambda h=head, x=x: run_backward(h(x.requires_grad_(True)).float().sum()))
                out[f"fake-cuda/{name}/{dname}/train"] = [(op.op, op.shapes, op.dtypes) for op in ops]


def _extension_available() -> bool:
    import mldecoder_fast
    return bool(mldecoder_fast.backends()["cpp"]["available"])


def record(path: str) -> None:
    import mldecoder_fast
    torch.set_num_threads(1)
    out = {"source": os.path.dirname(os.path.abspath(mldecoder_fast.__file__))}
    _cpu_records(out)
    _fake_cuda_records(out)
    torch.save(out, path)
    print(f"{path}: {len(out) - 1} records from {out['source']}")


def _same(a, b) -> bool:
    """Bit for bit (NaN payloads and the signs of zeros included)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.detach().contiguous().flatten().view(torch.uint8), b.detach().contiguous().flatten().view(torch.uint8))
    return a == b


def compare(path_a: str, path_b: str) -> int:
    a, b = torch.load(path_a, weights_only=False), torch.load(path_b, weights_only=False)
    print(f"A: {a.pop('source')}\nB: {b.pop('source')}")
    problems = [f"only in A: {k}" for k in a.keys() - b.keys()] + [f"only in B: {k}" for k in b.keys() - a.keys()]
    problems += [f"differs: {k}" for k in sorted(a.keys() & b.keys()) if not _same(a[k], b[k])]
    for p in problems:
        print(p)
    print(f"{len(a.keys() & b.keys())} records compared: " + ("bit-identical" if not problems else
                                                               f"{len(problems)} differ"))
    return 1 if problems else 0


def against(commit: str) -> int:
    from base_tree import HERE, worktree_at  # (a sibling script: bench/ is on the path when run)
    with worktree_at(commit) as (tree, tmp, same_csrc):
        if not same_csrc:
            print(f"csrc/ differs from {commit}: its cpp backend is not compared")
        base, head = os.path.join(tmp, "base.pt"), os.path.join(tmp, "head.pt")
        script = os.path.abspath(__file__)
        subprocess.run([sys.executable, script, "record", base], check=True, cwd=tree,
                       env={**os.environ, "PYTHONPATH": tree})
        subprocess.run([sys.executable, script, "record", head], check=True, cwd=HERE,
                       env={**os.environ, "PYTHONPATH": HERE})
        return compare(base, head)


def main(argv: list[str]) -> int:
    if argv[:1] == ["record"] and len(argv) == 2:
        record(argv[1])
        return 0
    if argv[:1] == ["compare"] and len(argv) == 3:
        return compare(argv[1], argv[2])
    if argv[:1] == ["against"] and len(argv) == 2:
        return against(argv[1])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
