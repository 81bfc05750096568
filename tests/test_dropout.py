"""Training-mode dropout: the fast head's logits have the reference's distribution.

Each test draws many training-mode forwards of both heads on the same weights and input and
compares the per-logit mean and spread, and the independence of samples within a batch (the
queries' dropout mask is per sample). A missing, doubled or misplaced dropout shifts these."""
from __future__ import annotations

import pytest
import torch
from heads import make_pair

DRAWS = 400


def _draws(head, x):
    head.train()
    with torch.no_grad():
        return torch.stack([head(x) for _ in range(DRAWS)])  # [R, B, classes]


def _stats(samples):
    mean = samples.mean(0)
    std = samples.std(0)
    # samples 0 and 1 of the batch see the same input: they differ only through dropout masks.
    pair_gap = (samples[:, 0] - samples[:, 1]).abs().mean()
    return mean, std, pair_gap


def _compare(ref, fast, x):
    mr, sr, gr = _stats(_draws(ref, x))
    mf, sf, gf = _stats(_draws(fast, x))
    se = (sr.pow(2) / DRAWS + sf.pow(2) / DRAWS).sqrt()
    z = ((mr - mf) / se.clamp_min(1e-8)).abs()
    assert z.mean() < 2.0, f"mean logits differ: mean |z| = {z.mean():.2f}"
    ratio = (sf.mean() / sr.mean()).item()
    assert 0.9 < ratio < 1.1, f"logit spread differs: fast/ref std ratio {ratio:.3f}"
    gap = (gf / gr).item()
    assert 0.9 < gap < 1.1, f"per-sample independence differs: gap ratio {gap:.3f}"
    return sr.mean().item()


def _set_only(module, which):
    """Keep one dropout site at p = 0.1, zero the others (names as in the official layer)."""
    layer = module.decoder.layers[0]
    for name in ("dropout", "dropout1", "dropout2", "dropout3"):
        getattr(layer, name).p = 0.1 if name == which else 0.0
    layer.multihead_attn.dropout = 0.1 if which == "attn" else 0.0


@pytest.fixture
def pair_and_input():
    torch.manual_seed(1)
    ref, fast = make_pair(12, 4, decoder_embedding=16, initial_num_features=8)
    x = torch.randn(1, 8, 3, 3).expand(2, -1, -1, -1).contiguous()
    return ref, fast, x


def test_all_dropouts_statistics(pair_and_input):
    ref, fast, x = pair_and_input
    spread = _compare(ref, fast, x)
    assert spread > 1e-3  # dropout is really active


@pytest.mark.parametrize("site", ["dropout1", "attn", "dropout2", "dropout", "dropout3"])
def test_each_dropout_site(pair_and_input, site):
    ref, fast, x = pair_and_input
    _set_only(ref, site), _set_only(fast, site)
    spread = _compare(ref, fast, x)
    assert spread > 1e-4, f"dropout at {site} has no effect"


def test_eval_is_deterministic(pair_and_input):
    ref, fast, x = pair_and_input
    fast.eval()
    assert torch.equal(fast(x), fast(x))
