"""Bad input fails early with a message naming what was expected and what was received."""
from __future__ import annotations

import pytest
import torch

from mldecoder_fast import MLDecoder, MLDecoderFast

HEADS = [MLDecoder, MLDecoderFast]


@pytest.mark.parametrize("cls", HEADS)
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_classes=0), ValueError, "num_classes must be >= 1, got 0"),
    (dict(num_classes=-5), ValueError, "num_classes must be >= 1"),
    (dict(num_classes=10, num_of_groups=0), ValueError, "num_of_groups must be positive"),
    (dict(num_classes=10, decoder_embedding=100), ValueError, "multiple of 8.*got 100"),
    (dict(num_classes=10, initial_num_features=0), ValueError, "initial_num_features must be >= 1"),
    (dict(num_classes=10.5), TypeError, "num_classes must be an int, got float"),
    (dict(num_classes=10, zsl=2), ValueError, "zsl must be 0 or 1"),
])
def test_constructor_errors(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        MLDecoderFast(10, backend="fortran")


@pytest.mark.parametrize("cls", HEADS)
def test_input_errors(cls):
    head = cls(10, 5, 32, 24).eval()
    cases = [
        (torch.randn(2, 23, 3, 3), ValueError, r"C = 24 features, got shape \(2, 23, 3, 3\)"),
        (torch.randn(2, 3, 3, 24), ValueError, "channels-last"),
        (torch.randn(2, 9, 23), ValueError, r"\[B, N, C\] input with C = 24 features"),
        (torch.randn(2, 24), ValueError, "rank 4 .* or rank 3 .* got rank 2"),
        (torch.randn(1, 2, 24, 3, 3), ValueError, "got rank 5"),
        (torch.randint(0, 5, (2, 24, 3, 3)), TypeError, "floating-point input .* got torch.int64"),
        (torch.randn(2, 24, 3, 3).double(), TypeError,
         "float64 does not match the head's parameter dtype torch.float32"),
        (torch.randn(2, 24, 0, 3), ValueError, "no spatial tokens"),
        ([1.0, 2.0], TypeError, "expects a torch.Tensor, got list"),
    ]
    for x, exc, match in cases:
        with pytest.raises(exc, match=match):
            head(x)


@pytest.mark.parametrize("cls", HEADS)
def test_zsl_errors(cls):
    head = cls(1, zsl=1, decoder_embedding=32, initial_num_features=24).eval()
    with pytest.raises(RuntimeError, match=r"no word vectors: call set_word_vectors\(v\)"):
        head(torch.randn(2, 24, 3, 3))
    with pytest.raises(ValueError, match=r"shape \[n, 300\].*got \(5, 299\)"):
        head.set_word_vectors(torch.randn(5, 299))
    with pytest.raises(ValueError, match=r"got \(300,\)"):
        head.set_word_vectors(torch.randn(300))
    with pytest.raises(RuntimeError, match="only for ZSL heads"):
        cls(10, decoder_embedding=32, initial_num_features=24).set_word_vectors(torch.randn(3, 300))


def test_device_mismatch_is_reported():
    """A head on the 'meta' device stands in for 'another device' on a machine without a GPU."""
    head = MLDecoderFast(10, 5, 32, 24, backend="torch")
    head.to("meta")
    with pytest.raises(ValueError, match="input is on cpu but the ML-Decoder head's parameters are on meta"):
        head(torch.randn(2, 24, 3, 3))


def test_unavailable_backend_warns_once_and_falls_back(recwarn):
    import mldecoder_fast.head.backends as b
    info = b.backends()
    missing = [n for n in ("cuda",) if not info[n]["available"]]
    if not missing:
        pytest.skip("every backend is available here")  # only on a GPU machine with the extension
    b._warned.clear(), b._selected.clear()
    head = MLDecoderFast(10, 5, 32, 24, backend="cuda").eval()
    x = torch.randn(2, 24, 3, 3)
    with pytest.warns(RuntimeWarning, match="falling back to the 'torch' backend"):
        head(x)
    head(x)
    assert head.active_backend == "torch"
    assert not [w for w in recwarn if "falling back" in str(w.message)]


def test_version_lists_backends_and_what_auto_runs(capsys):
    from mldecoder_fast.cli import main
    from mldecoder_fast.head.backends import select_ops
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "cpp", "cuda", "triton"):
        assert f"  {name} " in out
    cpu = torch.device("cpu")
    assert (f"backend='auto' runs: {select_ops('auto', cpu)[0]} on cpu (eval), "
            f"{select_ops('auto', cpu, training=True)[0]} on cpu (train)") in out
