"""add_ml_decoder_head on timm models: conv maps, token sequences, channels-last maps.

Small random-init variants at tiny input sizes (no download)."""
import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from helpers import assert_close  # noqa: E402

from mldecoder_fast import MLDecoder, MLDecoderFast  # noqa: E402
from mldecoder_fast.interop.timm_head import add_ml_decoder_head, ml_decoder_of  # noqa: E402
from mldecoder_fast.train.optim import build_optimizer  # noqa: E402

NUM_CLASSES = 5

# name, create_model kwargs, input side, expected head path, expected layout
MODELS = {
    "resnet": ("test_resnet", {}, 64, "fc", "NCHW"),
    "efficientnet": ("test_efficientnet", {}, 64, "classifier", "NCHW"),
    "convnext": ("test_convnext", {}, 64, "head.fc", "NCHW"),
    "vit": ("test_vit", {"img_size": 32, "patch_size": 8}, 32, "head", "NLC"),
    "swin": ("swin_tiny_patch4_window7_224",
             {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)},
             32, "head", "NHWC"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 1}, 32, "head", "NLC"),
}


def make(kind, fast=True, **kw):
    name, kwargs, side, _, _ = MODELS[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs)
    add_ml_decoder_head(model, num_classes=NUM_CLASSES, decoder_embedding=32, fast=fast, **kw)
    return model, side


@pytest.mark.parametrize("kind", list(MODELS))
def test_forward_backward_optimizer(kind):
    model, side = make(kind)
    _, _, _, path, layout = MODELS[kind]
    cfg = model.ml_decoder_cfg
    assert (cfg.path, cfg.layout) == (path, layout)
    head = ml_decoder_of(model)
    assert isinstance(head, MLDecoderFast)
    assert model.get_classifier() is head
    assert model.num_classes == NUM_CLASSES
    assert model.pretrained_cfg["num_classes"] == NUM_CLASSES
    assert model.pretrained_cfg["classifier"] == path
    assert f"{path}.decoder.duplicate_pooling" in model.state_dict()

    model.train()
    x = torch.randn(2, 3, side, side)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    out.square().sum().backward()
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert head.decoder.query_embed.weight.grad is None  # frozen, as in the official head

    opt = build_optimizer(model, lr=1e-2)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in trainable)
    assert id(head.decoder.query_embed.weight) not in in_opt
    before = head.decoder.duplicate_pooling.detach().clone()
    opt.step()
    assert not torch.equal(before, head.decoder.duplicate_pooling)

    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.dim() == (3 if layout in ("NLC", "NHWC") else 4)


def test_fast_matches_reference_inside_model():
    fast, side = make("convnext", fast=True)
    ref, _ = make("convnext", fast=False)
    assert isinstance(ml_decoder_of(ref), MLDecoder) and not isinstance(ml_decoder_of(ref), MLDecoderFast)
    ref.load_state_dict(fast.state_dict())
    fast.eval(), ref.eval()
    x = torch.randn(3, 3, side, side)
    with torch.no_grad():
        assert_close("logits", ref(x), fast(x), 1e-5)


def test_official_prefixes():
    """``fc.`` for ResNet, ``head.`` for TResNet: the keys of the released ML-Decoder files."""
    torch.manual_seed(0)
    resnet = add_ml_decoder_head(timm.create_model("test_resnet"), num_classes=3, decoder_embedding=16)
    assert "fc.decoder.embed_standart.weight" in resnet.state_dict()
    tresnet = add_ml_decoder_head(timm.create_model("tresnet_m"), num_classes=3, decoder_embedding=16)
    keys = tresnet.state_dict()
    assert "head.decoder.embed_standart.weight" in keys and "head.decoder.duplicate_pooling_bias" in keys
    assert not any(k.startswith("head.fc") for k in keys)
    assert tresnet(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.rounding
def test_default_num_classes_reset_and_deepcopy():
    model = timm.create_model("test_resnet", num_classes=6)
    add_ml_decoder_head(model, decoder_embedding=16)
    assert model.num_classes == 6
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    twin = copy.deepcopy(model)  # what model EMA does
    with torch.no_grad():
        assert_close("deepcopy", model(x), twin(x), 0.0)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    assert model.get_classifier().config.num_classes == 3
    model.reset_classifier(0)
    assert model(x).dim() == 4  # the unpooled features the head takes
    with pytest.raises(ValueError, match="replaces pooling"):
        model.reset_classifier(3, global_pool="avg")


def test_zsl_head():
    model = add_ml_decoder_head(timm.create_model("test_resnet"), num_classes=925, zsl=1, decoder_embedding=16)
    ml_decoder_of(model).set_word_vectors(torch.randn(81, 300))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 81)
    assert "fc.wordvec_proj.weight" in model.state_dict()


def test_unsupported_models_fail_clearly():
    with pytest.raises(TypeError, match="forward_features"):
        add_ml_decoder_head(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), num_classes=3)

    class Pooled(nn.Module):
        """timm-like API, but its features are already pooled."""
        num_features = 8
        num_classes = 4

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward_features(self, x):
            return x.mean((2, 3)).repeat(1, 3)[:, :8]

        def forward_head(self, x, pre_logits=False):
            return x if pre_logits else self.fc(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

        def get_classifier(self):
            return self.fc

        def reset_classifier(self, num_classes, global_pool=None):
            self.fc = nn.Linear(8, num_classes) if num_classes else nn.Identity()

    with pytest.raises(ValueError, match="cannot take an ML-Decoder head.*unpooled"):
        add_ml_decoder_head(Pooled(), num_classes=3)

    class Bypass(Pooled):
        """Features are fine, but forward never calls forward_head."""

        def forward_features(self, x):
            return x.repeat(1, 3, 1, 1)[:, :8]

        def forward(self, x):
            return self.forward_features(x).mean((2, 3))

    with pytest.raises(ValueError, match="does not go through forward_head"):
        add_ml_decoder_head(Bypass(), num_classes=3, decoder_embedding=16)

    model = add_ml_decoder_head(timm.create_model("test_resnet"), num_classes=3, decoder_embedding=16)
    with pytest.raises(ValueError, match="already has an ML-Decoder head"):
        add_ml_decoder_head(model, num_classes=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        add_ml_decoder_head(timm.create_model("test_resnet"), num_classes=3, decoder_embedding=20)
