"""``mldecoder-fast train singlelabel``: the 21,843-class run under 2 gloo processes resumed on 1,
exact resume, ImageFolder + softmax CE + AdamW, and bad input reported with file and line."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mldecoder_fast.cli import main
from mldecoder_fast.train import distributed as D
from mldecoder_fast.train.synthetic.imagenet21k import IMAGENET21K_CLASSES, generate_imagenet21k

TINY = ["--model", "test_resnet", "--image-size", "32", "--decoder-embedding", "32",
        "--num-of-groups", "100", "--workers", "0", "--no-progress", "--log-every", "1",
        "--warmup-epochs", "0.5"]


@pytest.fixture(scope="module")
def in21k(tmp_path_factory):
    root = tmp_path_factory.mktemp("in21k")
    meta = generate_imagenet21k(str(root), IMAGENET21K_CLASSES, train_images=48, val_images=8,
                                image_size=32, seed=0)
    return meta


def _list_args(meta):
    return ["--train-list", meta["train_list"], "--val-list", meta["val_list"],
            "--classes", meta["classes"]]


def _cli_worker(rank, world, argv):
    rc = main(argv)
    assert rc == 0, f"rank {rank}: exit code {rc}"


def _log(out):
    with open(os.path.join(out, "log.json")) as f:
        return json.load(f)


def test_generated_imagenet21k_spreads_labels(in21k):
    with open(in21k["train_list"]) as f:
        labels = [int(line.split()[1]) for line in f]
    assert len(labels) == 48 and len(set(labels)) == 48
    assert min(labels) < IMAGENET21K_CLASSES // 40 and max(labels) > IMAGENET21K_CLASSES * 39 // 40
    with open(in21k["classes"]) as f:
        assert sum(1 for _ in f) == IMAGENET21K_CLASSES


def test_21843_classes_two_processes_then_resume_on_one(in21k, tmp_path, capsys):
    """torchrun-style 2-process gloo run on 21,843 classes (A2 recipe: BCE with target threshold,
    LAMB, mixup/cutmix, RandAugment, repeated augmentation), checkpoint mid-epoch, resume on 1
    process with the same global batch."""
    out = str(tmp_path / "run")
    argv = ["train", "singlelabel", *_list_args(in21k), *TINY, "--batch-size", "4", "--epochs", "2",
            "--max-steps", "3", "--out", out]
    D.spawn_local(_cli_worker, 2, argv)
    log = _log(out)
    assert log["world_size"] == 2 and log["global_batch"] == 8 and log["num_classes"] == IMAGENET21K_CLASSES
    steps = log["steps"]
    assert [s[0] for s in steps] == [1, 2, 3]
    row = log["epochs"][-1]
    assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0 and "top1" in row and "top5" in row
    assert row["val_images"] == 8

    capsys.readouterr()
    rc = main(["train", "singlelabel", *_list_args(in21k), *TINY, "--epochs", "2", "--max-steps", "5",
               "--out", out, "--resume", os.path.join(out, "last.pth")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "batch 8 per process = 8 global" in text
    assert "written by 2 process(es), resumed on 1" in text
    log = _log(out)
    assert log["world_size"] == 1
    assert [s[0] for s in log["steps"]] == [1, 2, 3, 4, 5]
    assert all(s[1] == s[1] and s[1] < 1.0 for s in log["steps"])   # finite BCE
    # the learning rate keeps following the same warm-up + cosine schedule
    lrs = [s[2] for s in log["steps"]]
    assert lrs[3] != lrs[2] and all(lr > 0 for lr in lrs)
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert ckpt["step"] == 5 and ckpt["history"]["run"]["world_size"] == 1
    assert ckpt["model"]["fc.decoder.duplicate_pooling_bias"].shape == (IMAGENET21K_CLASSES,)


def test_exact_resume_mid_epoch(tmp_path):
    """Stopping after 4 steps (mid-epoch) and resuming gives bit-identical weights and losses to
    the uninterrupted run: data order, augmentation, mixup, dropout, drop-path, LAMB, schedule."""
    meta = generate_imagenet21k(str(tmp_path / "data"), 10, train_images=40, val_images=4,
                                image_size=32, seed=1)
    common = ["train", "singlelabel", *_list_args(meta), *TINY, "--batch-size", "4",
              "--aug-repeats", "1", "--epochs", "2", "--max-steps", "7"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--out", a]) == 0
    assert main(common[:-1] + ["4", "--out", b]) == 0
    assert main(common + ["--out", b, "--resume", os.path.join(b, "last.pth")]) == 0
    la, lb = _log(a), _log(b)
    assert [s[:2] for s in la["steps"]] == [s[:2] for s in lb["steps"]]
    wa = torch.load(os.path.join(a, "last.pth"), weights_only=True)["model"]
    wb = torch.load(os.path.join(b, "last.pth"), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]


def test_imagefolder_softmax_ce_adamw(tmp_path):
    from PIL import Image
    root = tmp_path / "folder"
    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "dog", "eel"):
            os.makedirs(root / split / c)
            for i in range(n):
                Image.new("RGB", (32, 32), (40 * i, 80 if c == "dog" else 0, 200)).save(root / split / c / f"{i}.png")
    out = str(tmp_path / "run")
    rc = main(["train", "singlelabel", "--data", str(root), *TINY, "--loss", "ce", "--opt", "adamw",
               "--mixup", "0", "--cutmix", "0", "--aa", "none", "--aug-repeats", "1",
               "--batch-size", "6", "--epochs", "1", "--lr", "1e-3", "--head", "reference", "--out", out])
    assert rc == 0
    row = _log(out)["epochs"][-1]
    assert row["val_images"] == 6 and 0 <= row["top1"] <= row["top5"] == 100.0  # 3 classes: top-5 = all
    with open(os.path.join(out, "log.csv")) as f:
        header = f.readline()
    assert "images_per_s" in header and "peak_memory_mb" in header and "top1" in header


# bad input --------------------------------------------------------------------------------------
def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(["train", "singlelabel", *argv, *TINY, "--batch-size", "2", "--epochs", "1"]) == 2
    return capsys.readouterr().err


def test_list_file_class_index_out_of_range(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text("# path class\na.png 0\n\na.png 5\n")
    err = _error(capsys, ["--train-list", str(tmp_path / "train.txt"), "--num-classes", "5"])
    assert "train.txt line 4" in err and "class index 5 is out of range" in err and "0..4" in err
    (tmp_path / "train.txt").write_text("a.png -1\n")
    err = _error(capsys, ["--train-list", str(tmp_path / "train.txt"), "--num-classes", "5"])
    assert "train.txt line 1" in err and "class index -1" in err
    (tmp_path / "train.txt").write_text("a.png 0\na.png three\n")
    err = _error(capsys, ["--train-list", str(tmp_path / "train.txt"), "--num-classes", "5"])
    assert "train.txt line 2" in err and "'three' is not an integer" in err


def test_missing_files_are_named(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text("a.png 0\nsub/missing.png 1\n")
    err = _error(capsys, ["--train-list", str(tmp_path / "train.txt"), "--num-classes", "2"])
    assert "1 of 2 image files" in err and "train.txt line 2" in err and "missing.png" in err
    err = _error(capsys, ["--train-list", str(tmp_path / "nope.txt"), "--num-classes", "2"])
    assert "nope.txt: list file not found" in err
    err = _error(capsys, ["--train-list", str(tmp_path / "train.txt"), "--classes", str(tmp_path / "c.txt")])
    assert "c.txt: class list not found" in err
    err = _error(capsys, ["--data", str(tmp_path / "nothing")])
    assert "nothing/train: folder not found" in err
    err = _error(capsys, ["--train-list", str(tmp_path / "train.txt")])
    assert "--num-classes N or --classes FILE" in err


def test_resume_with_other_class_count_is_refused(in21k, tmp_path, capsys):
    from mldecoder_fast.train.checkpoint import save_checkpoint
    ckpt = tmp_path / "other.pth"
    save_checkpoint(str(ckpt), model=torch.nn.Linear(1, 1), class_names=["a", "b"], model_args={})
    err = _error(capsys, [*_list_args(in21k), "--no-file-check", "--resume", str(ckpt)])
    assert "other.pth" in err and "2 classes" in err and "21843" in err
