"""State-dict layouts, checkpoint loading, from_module and convert."""
from __future__ import annotations

import pytest
import torch
from heads import make_pair, randomize_
from helpers import assert_close
from torch import nn

import mldecoder_fast
from mldecoder_fast import MLDecoder, MLDecoderFast, convert, head_state_dict, official_to_timm, timm_to_official
from mldecoder_fast.head.reference import DecoderLayer

OFFICIAL_KEYS = {
    "decoder.embed_standart.weight", "decoder.embed_standart.bias", "decoder.query_embed.weight",
    "decoder.duplicate_pooling", "decoder.duplicate_pooling_bias",
} | {f"decoder.layers.0.{n}" for n in (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "multihead_attn.in_proj_weight", "multihead_attn.in_proj_bias", "multihead_attn.out_proj.weight",
    "multihead_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")}


class OfficialStyleHead(nn.Module):
    """A head built the way the official code builds it (an ``nn.TransformerDecoder`` holding the
    layer, attributes attached to it), standing in for the official class in conversion tests."""

    def __init__(self, num_classes, k, d, c):
        super().__init__()
        self.decoder = nn.TransformerDecoder(DecoderLayer(d), num_layers=1)
        self.decoder.embed_standart = nn.Linear(c, d)
        self.decoder.query_embed = nn.Embedding(k, d).requires_grad_(False)
        g = -(-num_classes // k)
        self.decoder.num_classes = num_classes
        self.decoder.duplicate_factor = g
        self.decoder.duplicate_pooling = nn.Parameter(torch.randn(k, d, g))
        self.decoder.duplicate_pooling_bias = nn.Parameter(torch.randn(num_classes))
        self.zsl = 0


class TimmStyleHead(nn.Module):
    """timm's layout: embeddings and the group FC at the top, the layer under decoder.layers.0."""

    def __init__(self, num_classes, k, d, c):
        super().__init__()
        self.embed_standart = nn.Linear(c, d)
        self.query_embed = nn.Embedding(k, d).requires_grad_(False)
        self.decoder = nn.TransformerDecoder(DecoderLayer(d), num_layers=1)
        g = -(-num_classes // k)
        self.num_classes = num_classes
        self.duplicate_factor = g
        self.duplicate_pooling = nn.Parameter(torch.randn(k, d, g))
        self.duplicate_pooling_bias = nn.Parameter(torch.randn(num_classes))


def test_keys_are_official_and_shapes_match_spec():
    head = MLDecoderFast(101, 10, 32, 24)
    sd = head.state_dict()
    assert set(sd) == OFFICIAL_KEYS
    assert set(MLDecoder(101, 10, 32, 24).state_dict()) == OFFICIAL_KEYS
    assert sd["decoder.duplicate_pooling"].shape == (10, 32, 11)
    assert sd["decoder.duplicate_pooling_bias"].shape == (101,)
    assert sd["decoder.layers.0.multihead_attn.in_proj_weight"].shape == (96, 32)
    assert sd["decoder.layers.0.linear1.weight"].shape == (2048, 32)
    assert not head.decoder.query_embed.weight.requires_grad
    z = MLDecoderFast(1, zsl=1, decoder_embedding=32, initial_num_features=24).state_dict()
    assert "decoder.query_embed.weight" not in z
    assert z["wordvec_proj.weight"].shape == (32, 300)
    assert z["decoder.duplicate_pooling"].shape == (32, 1) and z["decoder.duplicate_pooling_bias"].shape == (1,)


def test_round_trip_ours_official_timm():
    ref, fast = make_pair(50, 7)
    x = torch.randn(2, 24, 3, 3)
    ref.eval()
    expected = ref(x)
    # ours -> official (the reference) -> ours
    back = MLDecoderFast(50, 7, 32, 24)
    back.load_state_dict(MLDecoder(50, 7, 32, 24).state_dict())  # something else first
    back.load_state_dict(ref.state_dict())
    assert_close("official->ours", expected, back.eval()(x), 1e-5)
    # ours -> timm layout -> ours (load_state_dict accepts timm's keys directly)
    timm_sd = official_to_timm(fast.state_dict())
    assert "duplicate_pooling" in timm_sd and "decoder.duplicate_pooling" not in timm_sd
    from_timm = MLDecoderFast(50, 7, 32, 24)
    from_timm.load_state_dict(timm_sd)
    assert_close("timm->ours", expected, from_timm.eval()(x), 1e-5)
    assert set(timm_to_official(timm_sd)) == OFFICIAL_KEYS


def test_whole_model_checkpoints_with_prefix():
    ref, _ = make_pair(50, 7)
    x = torch.randn(2, 24, 3, 3)
    expected = ref.eval()(x)
    for prefix in ("head.", "fc."):
        ckpt = {"model": {**{"body.conv.weight": torch.randn(3)},
                          **{prefix + k: v for k, v in ref.state_dict().items()}}, "epoch": 3}
        fast = MLDecoderFast(50, 7, 32, 24)
        fast.load_state_dict(head_state_dict(ckpt))
        assert_close(f"prefix {prefix}", expected, fast.eval()(x), 1e-5)
    timm_ckpt = {"head." + k: v for k, v in official_to_timm(ref.state_dict()).items()}
    fast = MLDecoderFast(50, 7, 32, 24)
    fast.load_state_dict(head_state_dict(timm_ckpt))
    assert_close("timm whole model", expected, fast.eval()(x), 1e-5)
    with pytest.raises(KeyError, match="no ML-Decoder head"):
        head_state_dict({"model": {"a.weight": torch.zeros(1)}})


def test_timm_layout_inside_a_model():
    ref, _ = make_pair(20, 5)
    model = nn.Sequential(nn.Identity(), MLDecoderFast(20, 5, 32, 24))
    model.load_state_dict({"1." + k: v for k, v in official_to_timm(ref.state_dict()).items()})
    x = torch.randn(2, 24, 3, 3)
    assert_close("nested timm load", ref.eval()(x), model.eval()(x), 1e-5)


@pytest.mark.parametrize("source", ["reference", "fast", "official", "timm"])
def test_from_module_keeps_outputs(source):
    if source == "reference":
        head = randomize_(MLDecoder(50, 7, 32, 24))
    elif source == "fast":
        head = randomize_(MLDecoderFast(50, 7, 32, 24))
    elif source == "official":
        head = randomize_(OfficialStyleHead(50, 7, 32, 24))
    else:
        head = randomize_(TimmStyleHead(50, 7, 32, 24))
    head.eval()
    oracle = MLDecoder(50, 7, 32, 24)
    oracle.load_state_dict(head.state_dict())
    x = torch.randn(2, 24, 3, 3)
    fast = MLDecoderFast.from_module(head)
    assert isinstance(fast, MLDecoderFast) and not fast.training
    assert_close(f"from_module({source})", oracle.eval()(x), fast(x), 1e-5)


def test_from_module_zsl_keeps_word_vectors_and_mode():
    ref, _ = make_pair(1, zsl=1)
    ref.train()
    fast = MLDecoderFast.from_module(ref)
    assert fast.training and fast.config.zsl
    assert torch.equal(fast.word_vectors, ref.word_vectors)
    x = torch.randn(2, 24, 3, 3)
    ref.eval(), fast.eval()
    assert_close("zsl from_module", ref(x), fast(x), 1e-5)


def test_convert_model_in_place():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 24, 3, padding=1)
            self.fc = OfficialStyleHead(40, 5, 32, 24)

        def forward(self, x):
            return self.fc(self.body(x))

    net = randomize_(Net()).eval()
    oracle = MLDecoder(40, 5, 32, 24)
    oracle.load_state_dict(net.fc.state_dict())
    x = torch.randn(2, 3, 4, 4)
    expected = oracle.eval()(net.body(x))
    out_model = convert(net)
    assert out_model is net and isinstance(net.fc, MLDecoderFast)
    assert_close("convert", expected, net(x), 1e-5)
    head = convert(MLDecoder(40, 5, 32, 24))  # a bare head converts too
    assert isinstance(head, MLDecoderFast)


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="not an ML-Decoder head"):
        MLDecoderFast.from_module(nn.Linear(3, 4))


def test_backends_report():
    info = mldecoder_fast.backends()
    assert set(info) == {"torch", "cpp", "cuda", "triton"}
    assert info["torch"]["available"] and "cpu" in info["torch"]["devices"]
    for name, entry in info.items():
        assert isinstance(entry["detail"], str) and entry["detail"], name
        if not entry["available"]:
            assert entry["devices"] == [] or name == "triton"
