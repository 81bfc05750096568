"""ONNX export (mldecoder_fast/serving/export.py: ``export_onnx``, ``mldecoder-fast export``) and torch.export.

Every exported file is run in ONNX Runtime and compared with the eager module, at the batch it
was exported with and at another one (dynamic batch). Bad inputs must fail clearly and leave no
file behind.
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from mldecoder_fast import MLDecoder, MLDecoderFast, backends, convert, export_onnx  # noqa: E402
from mldecoder_fast.cli import main  # noqa: E402
from mldecoder_fast.serving.export import OnnxRuntimeModule  # noqa: E402

C, N_SIDE = 24, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _head(cls=MLDecoderFast, zsl=0, **kw):
    torch.manual_seed(0)
    head = cls(14, num_of_groups=4, decoder_embedding=16, initial_num_features=C, zsl=zsl, **kw)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and LayerNorm affines off their defaults
    return head.eval()


def _x(batch, seed=1):
    return torch.rand(batch, C, N_SIDE, N_SIDE, generator=torch.Generator().manual_seed(seed))


def _files(directory):
    return sorted(os.listdir(directory))


def _agrees_in_ort(path, module, batch, tol=1e-5):
    x = _x(batch, seed=batch)
    with torch.no_grad():
        want = module(x)
    assert_close(f"onnxruntime at batch {batch}", want, OnnxRuntimeModule(path)(x), tol)


# -- export_onnx -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_head_exports_with_dynamic_batch(tmp_path, backend):
    if not backends()[backend]["available"]:
        pytest.skip(backends()[backend]["detail"])
    head = _head(backend=backend)
    out = tmp_path / "head.onnx"
    result = export_onnx(head, _x(2), out)
    assert result.path == out and result.checked_batches == (2, 3) and result.check_error < 1e-5
    assert _files(tmp_path) == ["head.onnx"]
    assert head.backend == backend  # exported on the torch backend, then restored
    import onnx
    dim = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # a named, free batch dimension
    for batch in (1, 3, 5):
        _agrees_in_ort(out, head, batch)


def test_static_batch_and_batch_one_example(tmp_path):
    head = _head()
    static = export_onnx(head, _x(2), tmp_path / "static.onnx", dynamic_batch=False)
    assert static.checked_batches == (2,)
    with pytest.raises(Exception, match="invalid dimensions"):
        OnnxRuntimeModule(static.path)(_x(3))
    # An example of batch 1 still gives a graph with a free batch dimension.
    one = export_onnx(head, _x(1), tmp_path / "one.onnx")
    assert one.checked_batches == (1, 2)
    _agrees_in_ort(one.path, head, 4)


def test_zsl_head_exports_its_word_vectors(tmp_path):
    head = _head(zsl=1)
    wv = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    head.set_word_vectors(wv)
    out = tmp_path / "zsl.onnx"
    export_onnx(head, _x(2), out)
    _agrees_in_ort(out, head, 3)
    assert OnnxRuntimeModule(out)(_x(3)).shape == (3, 5)


class _ExportsDifferently(torch.nn.Module):
    """Eager and exported graphs differ: the check must catch it."""

    def __init__(self):
        super().__init__()
        self.head = _head()

    def forward(self, x):
        y = self.head(x)
        return y * 1.01 if torch.compiler.is_exporting() else y


def test_check_rejects_a_graph_that_differs_and_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="differs from the module"):
        export_onnx(_ExportsDifferently().eval(), _x(2), tmp_path / "bad.onnx")
    assert _files(tmp_path) == []
    export_onnx(_ExportsDifferently().eval(), _x(2), tmp_path / "unchecked.onnx", check=False)
    assert _files(tmp_path) == ["unchecked.onnx"]


def test_bad_inputs_fail_clearly_and_leave_no_file(tmp_path):
    with pytest.raises(ValueError, match="eval mode.*training mode"):
        export_onnx(_head().train(), _x(2), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="ZSL.*without word vectors.*set_word_vectors"):
        export_onnx(_head(zsl=1), _x(2), tmp_path / "b.onnx")
    with pytest.raises(FileNotFoundError, match="expected an existing directory"):
        export_onnx(_head(), _x(2), tmp_path / "missing" / "c.onnx")
    with pytest.raises(IsADirectoryError, match="expected a file path"):
        export_onnx(_head(), _x(2), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="got a file"):
        export_onnx(_head(), _x(2), tmp_path / "file" / "d.onnx")
    assert _files(tmp_path) == ["file"]
    if os.geteuid() != 0:  # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="not writable"):
            export_onnx(_head(), _x(2), ro / "e.onnx")
        assert _files(ro) == []


# -- torch.export --------------------------------------------------------------------------------

@pytest.mark.rounding
def test_torch_export_of_the_head():
    head = _head()
    ep = torch.export.export(head, (_x(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for batch in (2, 5):
        with torch.no_grad():
            assert_close(f"torch.export at batch {batch}", head(_x(batch)), ep.module()(_x(batch)), 1e-6)


def test_torch_export_and_onnx_of_a_converted_timm_model(tmp_path):
    timm = pytest.importorskip("timm")
    from mldecoder_fast import add_ml_decoder_head
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    add_ml_decoder_head(model, num_classes=10, num_of_groups=5, decoder_embedding=32, fast=False)
    model = convert(model).eval()
    assert any(isinstance(m, MLDecoderFast) for m in model.modules())
    x = torch.rand(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        want = model(x)
    assert_close("torch.export of the converted model", want, ep.module()(x), 1e-5)
    result = export_onnx(model, x, tmp_path / "model.onnx")
    assert result.check_error < 1e-4


# -- mldecoder-fast export -------------------------------------------------------------------------

def test_export_command_head_state_dict(tmp_path, capsys):
    head = _head(MLDecoder)
    ckpt, out = tmp_path / "head.pth", tmp_path / "head.onnx"
    torch.save(head.state_dict(), ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out), "--feature-shape", f"{C},3,3"]) == 0
    text = capsys.readouterr().out
    assert "the ML-Decoder head (14 classes, 4 queries)" in text and "checked in ONNX Runtime" in text
    _agrees_in_ort(out, head, 3)


def test_export_command_whole_model_checkpoint(tmp_path, capsys):
    pytest.importorskip("timm")
    from mldecoder_fast.train.checkpoint import save_checkpoint
    from mldecoder_fast.train.models import model_from_args
    margs = {"model": "test_resnet", "num_classes": 6, "num_of_groups": 3, "decoder_embedding": 32,
             "image_size": 32}
    torch.manual_seed(0)
    model = model_from_args(margs).eval()
    ckpt, out = tmp_path / "model.pth", tmp_path / "model.onnx"
    save_checkpoint(str(ckpt), model=model, class_names=[f"c{i}" for i in range(6)], model_args=margs)
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out)]) == 0
    assert "test_resnet with its ML-Decoder head (6 classes)" in capsys.readouterr().out
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    assert_close("exported model at batch 3", want, OnnxRuntimeModule(out)(x), 1e-4)


def test_export_command_takes_a_zsl_heads_word_vectors(tmp_path, capsys):
    """A zero-shot head alone from the command line: its word vectors from --word-vectors (any
    number of classes, the official [300, C] orientation too), constants of the graph."""
    head = _head(zsl=1)
    torch.save(head.state_dict(), tmp_path / "zsl.pth")
    vectors = torch.randn(300, 9)                                    # official orientation
    torch.save(vectors, tmp_path / "wv.pth")
    out = tmp_path / "z.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "zsl.pth"), "--onnx", str(out),
                 "--word-vectors", str(tmp_path / "wv.pth"), "--feature-shape", f"{C},{N_SIDE},{N_SIDE}"]) == 0
    assert "(9 classes" in capsys.readouterr().out
    head.eval().set_word_vectors(vectors.t().contiguous())
    _agrees_in_ort(out, head, 3)


def test_export_command_errors(tmp_path, capsys):
    ckpt = tmp_path / "zsl.pth"
    torch.save(_head(zsl=1).state_dict(), ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "z.onnx")]) == 2
    err = capsys.readouterr().err
    assert "without word vectors" in err and "--word-vectors" in err
    torch.save(torch.randn(300, 4), tmp_path / "wv.pth")
    torch.save(_head().state_dict(), tmp_path / "plain.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "plain.pth"), "--onnx", str(tmp_path / "z.onnx"),
                 "--word-vectors", str(tmp_path / "wv.pth")]) == 2
    assert "--word-vectors is for zero-shot (ZSL) checkpoints" in capsys.readouterr().err
    torch.save(torch.randn(299, 4), tmp_path / "wv.pth")
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "z.onnx"),
                 "--word-vectors", str(tmp_path / "wv.pth")]) == 2
    assert "word vectors of shape [299, 4]" in capsys.readouterr().err
    (tmp_path / "plain.pth").unlink()
    (tmp_path / "wv.pth").unlink()
    torch.save(_head().state_dict(), ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "no" / "z.onnx")]) == 2
    assert "expected an existing directory" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none.pth"), "--onnx", str(tmp_path / "z.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    assert _files(tmp_path) == ["zsl.pth"]
