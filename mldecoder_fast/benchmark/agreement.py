"""Whether an implementation computes what the reference does, before it is timed (see
``runner.py``'s docstring): outputs and gradients against the float64 reference within
max(2x the reference's own error in the run's dtype, ``ERROR_FLOOR``), and non-finite logits from
a NaN in one sample's features exactly where the reference has them."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..numerics import rel_rms
from .cases import Case, autocast_context, dropout_disabled, fp64_case, prepare, training_loss, unwrapped
from .contenders import reference_impl


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (low-precision results are compared in fp32, float64 ones stay float64)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


# Relative RMS error vs the float64 reference that every implementation may have whatever the
# reference's own error, per run dtype: (outputs, gradients). fp32/fp64 rows: the reference's own
# error is far below, so these are the bounds. Low precision: about what rounding the inputs of
# the GEMMs to that dtype costs; the bound is usually 2x the reference's own error, above it.
ERROR_FLOOR = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (2e-4, 2e-3),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


class AgreementError(AssertionError):
    """An implementation's output or gradients differ from the reference's."""


def comparison_outputs(model: nn.Module, case: Case) -> dict:
    """Outputs to compare: eval logits; in training (dropout off) logits and every gradient."""
    x = case.inputs[0]
    ctx = autocast_context(case.device, case.dtype)
    if case.mode == "eval":
        with torch.no_grad(), ctx:
            return {"logits": _wide(model(x))}
    x = x.detach().clone().requires_grad_(True)
    inner = unwrapped(model)
    with dropout_disabled(inner):
        with ctx:
            logits = model(x)
        training_loss(logits, case.target).backward()
    out = {"logits": _wide(logits), "grad:input": _wide(x.grad)}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            out[f"grad:{name}"] = None if p.grad is None else _wide(p.grad).clone()
    model.zero_grad(set_to_none=True)
    return out


def nan_input(case: Case) -> torch.Tensor:
    """The case's input with one feature of its first sample set to NaN."""
    x = case.inputs[0].detach().clone()
    x.view(x.shape[0], -1)[0, x[0].numel() // 2] = float("nan")
    return x


def nonfinite_logits(model: nn.Module, case: Case) -> torch.Tensor:
    """Which logits ``model`` makes non-finite from ``nan_input`` (eval: a forward without autograd;
    train: a training-mode forward with autograd, every dropout at p = 0, no backward)."""
    x = nan_input(case)
    with dropout_disabled(unwrapped(model)), autocast_context(case.device, case.dtype), \
            torch.set_grad_enabled(case.mode == "train"):
        logits = model(x.requires_grad_(case.mode == "train"))
    return ~torch.isfinite(logits.detach())


def set_expectations(case: Case, reference: nn.Module) -> dict:
    """Run the float64 reference on ``case``'s weights and inputs and set, per compared tensor,
    ``case.exact`` (its value), ``case.reference_errors`` (the error of ``reference``, the reference
    in the case's dtype) and ``case.allowed`` = max(2 x that error, ``ERROR_FLOOR``). Returns the
    outputs of ``reference``."""
    own = comparison_outputs(reference, case)
    if case.dtype == torch.float64:
        exact = own
    else:
        case64 = fp64_case(case)
        exact = comparison_outputs(prepare(reference_impl(), case64), case64)
    case.exact = exact
    case.reference_errors, case.allowed = error_bounds(exact, own, case.dtype)
    case.nonfinite = nonfinite_logits(reference, case)
    return own


def error_bounds(exact: dict, reference: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """Per tensor of ``exact`` (float64 values): the error of ``reference`` (the reference's values
    in ``dtype``) and the bound max(2 x that error, ``ERROR_FLOOR[dtype]``); a tensor the
    reference got non-finite or missing is bound by the floor alone."""
    floor_out, floor_grad = ERROR_FLOOR.get(dtype, ERROR_FLOOR[torch.float32])
    errors, allowed = {}, {}
    for key, want in exact.items():
        if want is None:
            continue
        floor = floor_out if key == "logits" else floor_grad
        err = errors[key] = rel_rms(want, reference[key]) if reference.get(key) is not None else math.nan
        allowed[key] = max(2 * err, floor) if math.isfinite(err) else floor
    return errors, allowed


@dataclass
class Agreement:
    ok: bool
    error: float   # worst relative RMS error vs the float64 reference over the compared tensors
    errors: dict   # per tensor: relative RMS error vs the float64 reference
    detail: str    # what is out of bounds, and by how much


def judge(case: Case, got: dict) -> Agreement:
    """Judge outputs ``got`` (as ``comparison_outputs`` returns them) against ``case``'s bounds."""
    assert case.exact is not None, "set_expectations(case, reference) first"
    errors, problems = {}, []
    for key, want in case.exact.items():
        if want is None:
            continue
        out = got.get(key)
        if out is None:
            problems.append(f"{key} missing")
            continue
        if out.shape != want.shape:
            problems.append(f"{key} shape {tuple(out.shape)} != {tuple(want.shape)}")
            continue
        if not torch.isfinite(out).all() and torch.isfinite(want).all():
            problems.append(f"{key} has NaN/Inf")
            continue
        err = errors[key] = rel_rms(want, out)
        if not err <= case.allowed[key]:
            problems.append(f"{key} rel. RMS error vs fp64 {err:.1e} > allowed {case.allowed[key]:.1e} "
                            f"(reference's {case.reference_errors[key]:.1e})")
    return Agreement(not problems, max(errors.values(), default=0.0), errors, "; ".join(problems))


def check_agreement(model: nn.Module, case: Case, nonfinite_must_match: bool = True) -> Agreement:
    """Judge ``model`` on ``case`` (see ``judge``), then feed it ``nan_input``: its non-finite
    logits must be the reference's (a NaN in a sample's features must reach that sample's logits,
    and only those). With ``nonfinite_must_match`` False (a peer runtime) a difference is only
    reported in the detail."""
    verdict = judge(case, comparison_outputs(model, case))
    got = nonfinite_logits(model, case)
    if case.nonfinite is None or torch.equal(got, case.nonfinite):
        return verdict
    problem = (f"a NaN in sample 0's features: {int(got.sum())} non-finite logits in samples "
               f"{sorted(set(got.nonzero()[:, 0].tolist()))}, the reference's {int(case.nonfinite.sum())} in "
               f"{sorted(set(case.nonfinite.nonzero()[:, 0].tolist()))}")
    if not nonfinite_must_match:
        problem += " (reported, not judged: a peer runtime)"
    detail = "; ".join(d for d in (verdict.detail, problem) if d)
    return dataclasses.replace(verdict, ok=verdict.ok and not nonfinite_must_match, detail=detail)
