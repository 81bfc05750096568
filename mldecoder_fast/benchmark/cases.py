"""One case of the benchmark (configuration, mode, device, dtype, batch): the shared weights, inputs
and targets (``make_case``), an implementation built on them (``prepare``), and the timed step
(``make_step``: an eval forward, or forward, loss, backward and an AdamW step)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..head.reference import MLDecoder
from .configs import BenchConfig

if TYPE_CHECKING:
    from .contenders import Impl

MODES = ("eval", "train")


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weights stay fp32 under autocast; fp32/fp64 runs keep weights in the run's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dropout_sites(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every dropout rate: nn.Dropout.p, nn.MultiheadAttention-style
    ``.dropout``."""
    return [(m, "p") if isinstance(m, nn.Dropout) else (m, "dropout") for m in model.modules()
            if isinstance(m, nn.Dropout) or isinstance(getattr(m, "dropout", None), float)]


@contextlib.contextmanager
def dropout_disabled(model: nn.Module):
    """Set p = 0 on every dropout site (``dropout_sites``)."""
    saved = [(m, attr, getattr(m, attr)) for m, attr in dropout_sites(model)]
    for m, attr, _ in saved:
        setattr(m, attr, 0.0)
    try:
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


@dataclass
class Case:
    """Everything shared by the implementations of one (config, mode, device, dtype, batch)."""
    cfg: BenchConfig
    mode: str
    device: torch.device
    dtype: torch.dtype
    batch: int
    state_dict: dict
    inputs: list            # one or more inputs (rotated on CUDA so L2 does not flatter)
    target: torch.Tensor | None
    word_vectors: torch.Tensor | None
    # Filled by set_expectations: per compared tensor (logits, grad:input, grad:<parameter>), the
    # float64 reference's value, the reference's own error in this case's dtype, and the bound.
    exact: dict | None = None
    reference_errors: dict | None = None
    allowed: dict | None = None
    # Filled by set_expectations: which logits the reference (in this case's dtype) makes
    # non-finite from ``nan_input`` (a NaN in one sample's features).
    nonfinite: torch.Tensor | None = None


def make_case(cfg: BenchConfig, mode: str, device, dtype: torch.dtype, batch: int,
              seed: int = 0) -> Case:
    device = torch.device(device)
    torch.manual_seed(seed)
    ref = cfg.make_head(MLDecoder)
    gen = torch.Generator().manual_seed(seed + 7)
    sd = {}
    for key, value in ref.state_dict().items():
        if value.is_floating_point() and (key.endswith("bias") or ".norm" in key):
            # Biases start at zero and LayerNorm affines at one/zero: perturb them so that a
            # misapplied bias or affine cannot hide behind the default initialisation.
            value = value + 0.1 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        sd[key] = value.to(device=device, dtype=param_dtype(dtype)) if value.is_floating_point() \
            else value.to(device)
    inputs = [cfg.make_input(batch, device, dtype, seed=seed)]
    if device.type == "cuda":
        # Rotate inputs whose total is about 2x an L2 cache, so each call reads from HBM.
        per = max(1, inputs[0].numel() * inputs[0].element_size())
        extra = min(7, math.ceil((100 << 20) / per) - 1)
        inputs += [cfg.make_input(batch, device, dtype, seed=seed + 1 + i) for i in range(extra)]
    g = torch.Generator().manual_seed(seed + 100)
    target = None
    if mode == "train":
        target = (torch.rand(batch, cfg.classes_for(mode), generator=g) < 0.1).float().to(device)
    wv = cfg.word_vectors(mode).to(device=device, dtype=param_dtype(dtype)) if cfg.zsl else None
    return Case(cfg, mode, device, dtype, batch, sd, inputs, target, wv)


def unwrapped(model: nn.Module) -> nn.Module:
    """The head inside torch.compile's wrapper (``_orig_mod``) or a graph wrapper (``module``)."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def held_bytes(model: nn.Module) -> int:
    """Bytes a head holds between steps beyond its parameters and buffers (``MLDecoderFast``'s
    caches: eval queries, weight copies, packed weights), which a step's peak, counted
    from what existed before it, would not show."""
    module = unwrapped(model)
    caches = getattr(module, "caches", None)
    return 0 if caches is None else caches.nbytes(exclude=[*module.parameters(), *module.buffers()])


def prepare(impl: Impl, case: Case) -> nn.Module:
    """Build ``impl`` with the case's weights, device, mode and word vectors."""
    torch.manual_seed(0)
    model = impl.make(case.cfg)
    target_module = unwrapped(model)
    target_module.to(device=case.device, dtype=param_dtype(case.dtype))
    target_module.load_state_dict(case.state_dict)
    if case.word_vectors is not None:
        target_module.set_word_vectors(case.word_vectors)
    model.train(case.mode == "train")
    return impl.wrap(model, case) if impl.wrap is not None else model


def fp64_case(case: Case) -> Case:
    """The same case in float64 without autocast: weights, inputs and word vectors upcast (exactly)."""
    def up(t):
        return t.double() if t is not None and t.is_floating_point() else t
    return dataclasses.replace(case, dtype=torch.float64, state_dict={k: up(v) for k, v in case.state_dict.items()},
                               inputs=[up(case.inputs[0])], word_vectors=up(case.word_vectors),
                               exact=None, reference_errors=None, allowed=None)


def training_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE in fp32 (fp64 for a float64 run, so that the fp64 reference is exact throughout)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def training_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The timed steps' AdamW, its state already allocated.

    A small learning rate: the weights move (so every copy derived from them must be refreshed)
    but stay in range over hundreds of timed steps. ``fused=True`` where this PyTorch has the
    fused kernel for the parameters' device and dtype (one pass, no temporaries), else the
    default implementation. The state is made by one step at learning rate 0 on zero gradients,
    which leaves the weights as they are."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)
        optimizer.step()
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        optimizer = torch.optim.AdamW(params, lr=0.0)
        optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = 1e-6
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def make_step(model: nn.Module, case: Case) -> Callable[[], None]:
    """The timed callable: an eval forward, or a full training step (see module docstring)."""
    inputs = case.inputs
    counter = [0]
    ctx = lambda: autocast_context(case.device, case.dtype)  # noqa: E731
    if case.mode == "eval":
        def step():
            x = inputs[counter[0] % len(inputs)]
            counter[0] += 1
            with torch.no_grad(), ctx():
                model(x)
        return step
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    target = case.target
    optimizer = training_optimizer(model)

    def step():
        x = xs[counter[0] % len(xs)]
        counter[0] += 1
        with ctx():
            logits = model(x)
        training_loss(logits, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
    return step
