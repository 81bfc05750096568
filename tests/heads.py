"""Builders shared by the head tests: a reference and a fast head with identical, randomized weights."""
from __future__ import annotations

import torch
from torch import nn

from mldecoder_fast import MLDecoder, MLDecoderFast

# The standard configurations (docs/design.md, Configurations): name -> (C, N, classes, K, input kind)
STANDARD_CONFIGS = {
    "coco-tresnet_l-448": (2048, 196, 80, 80, "map"),
    "imagenet1k-resnet50-224": (2048, 49, 1000, 100, "map"),
    "openimages-tresnet_m-224": (2048, 49, 9605, 200, "map"),
    "imagenet21k-resnet50-224": (2048, 49, 21843, 100, "map"),
    "vit-b16-224": (768, 197, 1000, 100, "tokens"),
    "zsl-nus-wide-224": (2048, 49, 925, -1, "zsl"),
}


def randomize_(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Perturb every parameter (LayerNorm affines, zero-initialised biases) so that a wrongly
    applied affine or bias cannot hide behind the default init."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def disable_dropout_(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return module


def check_train_grads(ref, fast, x, ratio):
    """Training mode, dropout off: outputs, input gradient and every parameter gradient agree."""
    from helpers import assert_close
    ref.train(), fast.train()
    disable_dropout_(ref), disable_dropout_(fast)
    xr = x.detach().clone().requires_grad_(True)
    xf = x.detach().clone().requires_grad_(True)
    out_r, out_f = ref(xr), fast(xf)
    assert_close("train output", out_r, out_f, ratio)
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_f * g).sum().backward()
    assert_close("input grad", xr.grad, xf.grad, ratio)
    pr, pf = dict(ref.named_parameters()), dict(fast.named_parameters())
    assert pr.keys() == pf.keys()
    for name, p in pr.items():
        if not p.requires_grad:
            assert not pf[name].requires_grad, f"{name} should stay frozen"
            continue
        assert pf[name].grad is not None, f"no gradient reached {name}"
        assert_close(f"grad of {name}", p.grad, pf[name].grad, ratio)


def make_pair(num_classes, num_of_groups=-1, decoder_embedding=32, initial_num_features=24, zsl=0,
              backend="torch", dtype=torch.float32, device="cpu", word_vectors=None):
    ref = MLDecoder(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl)
    randomize_(ref)
    ref = ref.to(device=device, dtype=dtype)
    fast = MLDecoderFast(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl,
                         backend=backend).to(device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    if zsl:
        if word_vectors is None:
            word_vectors = torch.randn(7, 300, device=device, dtype=dtype)
        ref.set_word_vectors(word_vectors)
        fast.set_word_vectors(word_vectors)
    return ref, fast


def make_triple(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl=0):
    """(reference, fast, float64 reference) in eval mode, on the same weights; ZSL heads share 9
    random word vectors."""
    ref, fast = make_pair(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl=zsl)
    ref64, _ = make_pair(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl=zsl)
    ref64.load_state_dict(ref.state_dict())
    ref64.double()
    if zsl:
        v = torch.randn(9, 300)
        for m in (ref, fast, ref64):
            m.set_word_vectors(v.to(next(m.parameters()).dtype))
    for m in (ref, fast, ref64):
        m.eval()
    return ref, fast, ref64


def make_input(kind, batch, features, tokens=9, dtype=torch.float32, device="cpu"):
    if kind == "tokens":
        return torch.randn(batch, tokens, features, dtype=dtype, device=device)
    h = max(1, int(tokens ** 0.5))
    w = max(1, tokens // h)
    return torch.randn(batch, features, h, w, dtype=dtype, device=device)
