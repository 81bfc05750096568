"""``mldecoder-fast train zsl``: the official NUS-WIDE formats (on a generated miniature), the
seen/unseen query swap, query augmentation in training only, metrics on hand-made cases, bad input."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mldecoder_fast.cli import main
from mldecoder_fast.train import zsl as Z
from mldecoder_fast.train.datasets import MultiLabelDataset
from mldecoder_fast.train.formats import nus_wide as N
from mldecoder_fast.train.formats.common import DataError
from mldecoder_fast.train.metrics import topk_prf, zsl_metrics
from mldecoder_fast.train.models import build_zsl_model, zsl_head
from mldecoder_fast.train.query_augment import QueryAugment
from mldecoder_fast.train.synthetic.nus_miniature import make_miniature
from mldecoder_fast.train.transforms import build_transforms

TINY = ["--model", "test_resnet", "--image-size", "32", "--decoder-embedding", "32", "--workers", "0",
        "--batch-size", "8", "--no-progress", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nus"))
    make_miniature(root, train_images=24, val_images=12, image_size=32, seed=0)
    return root


def _copy(mini, tmp_path):
    dst = str(tmp_path / "nus")
    shutil.copytree(mini, dst)
    return dst


def test_miniature_in_official_formats(mini):
    data = N.load_zsl_data(mini)
    assert len(data.class_names) == 24 and data.class_names == sorted(data.class_names)
    assert len(data.seen) == 18 and len(data.unseen) == 6 and not set(data.seen) & set(data.unseen)
    assert data.word_vectors.shape == (24, 300)
    raw = torch.load(os.path.join(mini, N.WORDVEC_NAME), weights_only=True)
    assert raw.shape == (300, 24)                       # the official [300, C] layout
    assert torch.equal(data.word_vectors, raw.t())
    assert len(data.train) == 24 and len(data.val) == 12
    assert all(s.labels for s in data.train) and data.train[0].where == "data.csv line 2"


def _trainer(mini, tmp_path, noise=0.5, extra=3):
    data = N.load_zsl_data(mini)
    torch.manual_seed(0)
    model = build_zsl_model("test_resnet", "fast", decoder_embedding=32)
    tr = MultiLabelDataset(data.train, data.class_names, build_transforms(32, train=True))
    va = MultiLabelDataset(data.val, data.class_names, build_transforms(32, train=False))
    cfg = Z.ZSLConfig(epochs=1, batch_size=8, lr=1e-3, query_noise=noise, extra_queries=extra,
                      workers=0, max_steps_per_epoch=2, out_dir=str(tmp_path / "run"), progress=False,
                      save_checkpoints=False, ema_decay=0.9)
    return Z.ZSLTrainer(model, data, tr, va, cfg, {"model": "test_resnet"}, log=lambda m: None), data


def test_query_swap_and_augmentation_only_in_training(mini, tmp_path):
    trainer, data = _trainer(mini, tmp_path)
    clean = {"train": trainer.queries("train"), "zsl": trainer.queries("zsl"), "gzsl": trainer.queries("gzsl")}
    assert [v.shape[0] for v in clean.values()] == [18, 6, 24]
    calls = []

    def record(head, args, out):
        calls.append((head.training, head.word_vectors.clone(), out.shape[1]))

    hooks = [zsl_head(m).register_forward_hook(record) for m in (trainer.model, trainer.ema.module)]
    trainer.fit()
    for h in hooks:
        h.remove()
    train_calls = [c for c in calls if c[0]]
    eval_calls = [c for c in calls if not c[0]]
    assert len(train_calls) == 2
    for _, q, width in train_calls:
        assert q.shape == (18 + 3, 300) and width == 18 + 3      # seen queries + extra negatives
        assert not torch.allclose(q[:18], clean["train"])         # noisy word queries
        rel = (q[:18] - clean["train"]).pow(2).mean().sqrt() / clean["train"].pow(2).mean().sqrt()
        assert 0.3 < float(rel) < 0.7                              # noise 0.5 x RMS
    assert not torch.equal(train_calls[0][1], train_calls[1][1])   # fresh draws every step
    # evaluation: clean unseen (ZSL) and all (GZSL) queries, model and EMA, every batch
    assert len(eval_calls) == 2 * 2 * 2                            # 2 phases x 2 models x 2 batches
    for _, q, width in eval_calls:
        assert width in (6, 24)
        assert torch.equal(q, clean["zsl"] if width == 6 else clean["gzsl"])
    # after evaluation the head is back on the clean seen queries
    assert torch.equal(zsl_head(trainer.model).word_vectors, clean["train"])
    row = trainer.history["epochs"][-1]
    for key in ("zsl_mAP", "zsl_F1@3", "zsl_P@5", "gzsl_mAP", "gzsl_R@5", "ema_zsl_mAP", "ema_gzsl_F1@3"):
        assert 0 <= row[key] <= 100, key


def test_no_augmentation_means_clean_training_queries(mini, tmp_path):
    trainer, _ = _trainer(mini, tmp_path, noise=0.0, extra=0)
    q, n_extra = trainer.training_queries()
    assert n_extra == 0 and torch.equal(q, trainer.queries("train"))
    default = QueryAugment(0.1, -1)
    assert default(q)[0].shape == q.shape     # a negative count adds nothing


def test_topk_metrics_hand_made():
    t = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    s = np.array([[.9, .8, .1, .2], [.1, .2, .9, .3], [.5, .4, .3, .2]])
    one = topk_prf(t, s, 1)          # image 3 has no positive: left out
    assert one["images"] == 2
    assert one["precision"] == pytest.approx(50.0) and one["recall"] == pytest.approx(100 / 3)
    assert one["f1"] == pytest.approx(40.0)
    two = topk_prf(t, s, 2)          # hits: image 1 -> class 0; image 2 -> none
    assert two["precision"] == pytest.approx(25.0) and two["recall"] == pytest.approx(100 / 3)
    assert two["f1"] == pytest.approx(100 * 2 / 7)
    assert topk_prf(t, s, 9)["recall"] == pytest.approx(100.0)   # k above the class count
    m = zsl_metrics(np.array([[1, 0], [0, 1], [1, 0]]), np.array([[.9, .1], [.2, .8], [.7, .3]]), ks=(1,))
    assert m["mAP"] == pytest.approx(100.0) and m["F1@1"] == pytest.approx(100.0)
    # class 0 ranks its positives 1st and 3rd: AP = (1/1 + 2/3) / 2
    m = zsl_metrics(np.array([[1, 0], [0, 1], [1, 0]]), np.array([[.9, .1], [.8, .8], [.7, .3]]), ks=(1,))
    assert m["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1.0) / 2)


def test_cli_trains_and_resumes_on_the_miniature(mini, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train", "zsl", "--data", mini, *TINY, "--max-steps-per-epoch", "2", "--out", out]
    assert main(argv + ["--epochs", "2", "--stop-after-epochs", "1"]) == 0
    assert main(argv + ["--epochs", "2", "--resume", os.path.join(out, "last.pth")]) == 0
    text = capsys.readouterr().out
    assert main(argv + ["--epochs", "3", "--resume", os.path.join(out, "last.pth")]) == 2
    assert "one-cycle schedule has 4 steps, this run 6" in capsys.readouterr().err
    assert "18 seen / 6 unseen" in text and "2 extra queries" in text and "resumed from" in text
    with open(os.path.join(out, "log.json")) as f:
        log = json.load(f)
    assert [r["epoch"] for r in log["epochs"]] == [1, 2] and [s[0] for s in log["steps"]] == [1, 2, 3, 4]
    assert log["query_augment"] == {"noise": 0.1, "extra": 2}


def test_predict_scores_a_zsl_checkpoints_classes_by_their_word_vectors(mini, tmp_path, capsys):
    """``predict --word-vectors`` on a zero-shot checkpoint: every class of its class list scored
    through its word vector, as the model with those vectors set scores it; without the file, or
    with one of another class count, a clear error."""
    from mldecoder_fast.serving.predict import load_predictor
    from mldecoder_fast.train.datasets import load_rgb
    from mldecoder_fast.train.formats.common import Sample
    out = str(tmp_path / "run")
    assert main(["train", "zsl", "--data", mini, *TINY, "--max-steps-per-epoch", "1", "--epochs", "1",
                 "--out", out]) == 0
    ckpt, vectors = os.path.join(out, "best.pth"), os.path.join(mini, N.WORDVEC_NAME)
    image = sorted(os.path.join(mini, "images", f) for f in os.listdir(os.path.join(mini, "images")))[0]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", ckpt, "--word-vectors", vectors, "--threshold", "0",
                 "--top-k", "24", "--json", image]) == 0
    found = json.loads(capsys.readouterr().out)["classes"]
    model, names, margs = load_predictor(ckpt, word_vectors=vectors, device="cpu")
    x = build_transforms(int(margs["image_size"]), train=False, mean=margs.get("mean", (0.0, 0.0, 0.0)),
                         std=margs.get("std", (1.0, 1.0, 1.0)))(load_rgb(Sample(image, (), image)))
    with torch.no_grad():
        scores = torch.sigmoid(model(x[None]))[0]
    assert len(names) == 24 and scores.shape == (24,)
    want = {n: round(float(v), 4) for n, v in zip(names, scores, strict=True)}
    assert {c["class"]: c["score"] for c in found} == want
    assert main(["predict", "--checkpoint", ckpt, image]) == 2
    err = capsys.readouterr().err
    assert "zero-shot (ZSL) head without word vectors" in err and "24 classes" in err
    torch.save(torch.randn(300, 23), tmp_path / "wv.pth")
    assert main(["predict", "--checkpoint", ckpt, "--word-vectors", str(tmp_path / "wv.pth"), image]) == 2
    assert "word vectors of shape [300, 23], expected [300, 24]" in capsys.readouterr().err
    # --weights auto: the EMA's when the checkpoint's metrics say it validated better
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved["metrics"]) == {"zsl_mAP", "ema_zsl_mAP"}
    key = next(k for k in saved["model"] if k.endswith("decoder.duplicate_pooling"))
    assert not torch.equal(saved["model"][key], saved["ema"]["module"][key])
    for ema_better in (True, False):
        saved["metrics"] = {"zsl_mAP": 1.0, "ema_zsl_mAP": 2.0 if ema_better else 0.5}
        torch.save(saved, tmp_path / "c.pth")
        model, _, _ = load_predictor(str(tmp_path / "c.pth"), word_vectors=vectors, device="cpu")
        want = saved["ema"]["module"][key] if ema_better else saved["model"][key]
        assert torch.equal(model.state_dict()[key], want)


# bad input --------------------------------------------------------------------------------------
def test_word_vector_width_mismatch_names_the_file(mini, tmp_path, capsys):
    root = _copy(mini, tmp_path)
    torch.save(torch.randn(50, 24), os.path.join(root, N.WORDVEC_NAME))
    with pytest.raises(DataError, match=r"wordvec_array\.pth: word vectors of shape \[50, 24\], expected \[300, 24\]"):
        N.load_zsl_data(root)
    torch.save(torch.randn(300, 23), os.path.join(root, N.WORDVEC_NAME))   # one class short
    assert main(["train", "zsl", "--data", root, *TINY]) == 2
    err = capsys.readouterr().err
    assert "wordvec_array.pth" in err and "24 classes" in err


def test_bad_nus_files_are_reported(mini, tmp_path):
    root = _copy(mini, tmp_path)
    os.remove(os.path.join(root, "images", "val_00003.png"))
    with pytest.raises(DataError, match=r"data\.csv line 29: .*val_00003\.png"):
        N.load_zsl_data(root)
    N.load_zsl_data(root, check_files=False)
    with open(os.path.join(root, N.SPLIT_NAME), "w") as f:
        json.dump({"test class": ["pink_star"]}, f)
    with pytest.raises(DataError, match=r"benchmark_81_v0\.json: test class 'pink_star' does not occur"):
        N.load_zsl_data(root, check_files=False)
    with open(os.path.join(root, N.CSV_NAME), "a") as f:
        f.write("images/x.png,\"['red_square']\",test\n")
    with pytest.raises(DataError, match=r"data\.csv line 38: split 'test'"):
        N.load_zsl_data(root, check_files=False)
    os.remove(os.path.join(root, N.CSV_NAME))
    with pytest.raises(DataError, match=r"data\.csv: not found"):
        N.load_zsl_data(root)


def test_label_list_formats():
    assert N.parse_label_list("['a', 'b c']") == ["a", "b c"]
    assert N.parse_label_list("[a, b]") == ["a", "b"]
    assert N.parse_label_list("[]") == []
