"""The multi-label training tools: metric, loss, EMA, optimizer, checkpoints and exact resume,
bad data, the --demo run and predict."""
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("sklearn")

from mldecoder_fast.cli import main  # noqa: E402
from mldecoder_fast.train.checkpoint import CheckpointError, check_classes, load_checkpoint, save_checkpoint  # noqa: E402
from mldecoder_fast.train.datasets import BadImageError, MultiLabelDataset  # noqa: E402
from mldecoder_fast.train.ema import ModelEma  # noqa: E402
from mldecoder_fast.train.formats.coco import load_coco  # noqa: E402
from mldecoder_fast.train.formats.common import DataError  # noqa: E402
from mldecoder_fast.train.formats.label_csv import load_csv  # noqa: E402
from mldecoder_fast.train.losses import AsymmetricLoss  # noqa: E402
from mldecoder_fast.train.metrics import average_precision, chance_map, mean_average_precision  # noqa: E402
from mldecoder_fast.train.models import build_model  # noqa: E402
from mldecoder_fast.train.multilabel import MultiLabelTrainer, TrainConfig  # noqa: E402
from mldecoder_fast.train.optim import (  # noqa: E402
    build_optimizer,
    build_scheduler,
    param_groups,  # noqa: E402
)
from mldecoder_fast.train.seeding import seed_everything  # noqa: E402
from mldecoder_fast.train.synthetic.digits import demo_datasets  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# mAP ------------------------------------------------------------------------------------------
def test_average_precision_hand_computed():
    # ranks 1..4 are samples 0..3; positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6])[0] == pytest.approx(5 / 6)
    # positives at ranks 2 and 4: AP = (1/2 + 2/4) / 2
    assert average_precision([0, 1, 0, 1], [0.9, 0.8, 0.7, 0.6])[0] == pytest.approx(0.5)
    # every positive first: AP = 1; order of the inputs does not matter, only the scores
    assert average_precision([0, 1, 1], [0.1, 0.7, 0.9])[0] == pytest.approx(1.0)
    # a class without positives scores 0 and still counts in the mean (official definition)
    t = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.2, 0.5], [0.9, 0.1], [0.8, 0.3]])
    # class 0: ranking by score is samples 1, 2, 0 -> positives at ranks 2, 3: (1/2 + 2/3) / 2
    assert mean_average_precision(t, s) == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 0) / 2)
    # ties: the later sample ranks first (the official argsort()[::-1] order, made deterministic)
    assert average_precision([1, 0], [0.5, 0.5])[0] == pytest.approx(0.5)
    assert chance_map(t) == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert mean_average_precision(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


def test_map_matches_per_class_loop():
    rng = np.random.default_rng(0)
    t = (rng.random((50, 7)) < 0.3).astype(float)
    s = rng.random((50, 7))
    aps = []
    for k in range(7):  # the definition, one class at a time
        order = np.argsort(-s[:, k])
        hits, total = 0, 0.0
        for rank, i in enumerate(order, start=1):
            if t[i, k] == 1:
                hits += 1
                total += hits / rank
        aps.append(total / (t[:, k].sum() + 1e-8))
    assert mean_average_precision(t, s) == pytest.approx(100 * np.mean(aps), rel=1e-12)


# Asymmetric Loss ------------------------------------------------------------------------------
def asl_direct(x, y, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    total = 0.0
    for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist(), strict=True):
        p = 1 / (1 + math.exp(-xi))
        if yi == 1:
            total += -((1 - p) ** gamma_pos) * math.log(max(p, eps))
        else:
            pm = max(p - clip, 0.0)
            total += -(pm ** gamma_neg) * math.log(max(1 - pm, eps))
    return total


@pytest.mark.parametrize("gammas", [(4, 0, 0.05), (2, 1, 0.0), (0, 0, 0.0)])
def test_asymmetric_loss_matches_formula(gammas):
    g_neg, g_pos, clip = gammas
    torch.manual_seed(0)
    x = torch.randn(6, 9, dtype=torch.float64) * 3
    y = (torch.rand(6, 9) < 0.3).double()
    loss = AsymmetricLoss(g_neg, g_pos, clip)(x, y)
    assert loss.item() == pytest.approx(asl_direct(x, y, g_neg, g_pos, clip), rel=1e-6)
    if g_neg == g_pos == 0:  # no focusing, no clip: binary cross-entropy summed
        bce = nn.functional.binary_cross_entropy_with_logits(x, y, reduction="sum")
        assert loss.item() == pytest.approx(bce.item(), rel=1e-6)


def test_asymmetric_loss_focal_weight_is_constant_in_backward():
    torch.manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(4, 5) < 0.5).double()
    AsymmetricLoss()(x, y).backward()
    # d/dx of -w * log-term with w fixed: positives -(1-p)^0 * (1-p); negatives: w * p_m'/(1-p_m)
    p = torch.sigmoid(x.detach())
    pm = (p - 0.05).clamp(min=0)
    w = pm ** 4
    grad_neg = w * torch.where(p > 0.05, p * (1 - p) / (1 - pm), torch.zeros_like(p))
    expected = torch.where(y == 1, -(1 - p), grad_neg)
    torch.testing.assert_close(x.grad, expected)


# EMA ------------------------------------------------------------------------------------------
@pytest.mark.rounding
def test_ema_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, decay=0.9)
    e0 = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves BN statistics and its counter
    ema.update(model)
    m = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * e0[k] + 0.1 * m[k])
        else:
            assert torch.equal(v, m[k])  # num_batches_tracked is copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    warm = ModelEma(model, decay=0.9997, warmup=True)
    warm.update(model)
    assert warm.current_decay() == pytest.approx(2 / 11)
    state = warm.state_dict()
    again = ModelEma(model, decay=0.5)
    again.load_state_dict(state)
    assert (again.decay, again.warmup, again.updates) == (0.9997, True, 1)


# optimizer and schedule -----------------------------------------------------------------------
def test_param_groups_and_schedule():
    from mldecoder_fast import MLDecoderFast
    head = MLDecoderFast(5, decoder_embedding=16, initial_num_features=8)
    no_decay, decay = param_groups(head, 1e-4)
    names = {id(p): n for n, p in head.named_parameters()}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "decoder.duplicate_pooling" in decayed and "decoder.layers.0.linear1.weight" in decayed
    assert all(not n.endswith("bias") and "norm" not in n for n in decayed)
    assert {names[id(p)] for p in no_decay["params"]} >= {"decoder.duplicate_pooling_bias",
                                                         "decoder.layers.0.norm1.weight"}
    all_ids = {id(p) for g in (no_decay, decay) for p in g["params"]}
    assert id(head.decoder.query_embed.weight) not in all_ids  # frozen: skipped
    # the layout checkpoints hold: two groups whatever the decay (resume must find them)
    assert [len(g["params"]) for g in param_groups(head, 0.0)] == [len(no_decay["params"]), len(decay["params"])]
    opt = build_optimizer(head, lr=1e-4, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert isinstance(build_optimizer(head, mode="l2"), torch.optim.Adam)
    sched = build_scheduler(opt, 1e-4, epochs=10, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4 / 25)
    assert int(np.argmax(lrs)) in (19, 20) and max(lrs) == pytest.approx(1e-4, rel=1e-3)
    assert lrs[-1] < 1e-7


# checkpoints and exact resume -----------------------------------------------------------------
def tiny_trainer(out, epochs=2, head="fast", seed=0, steps=2):
    seed_everything(seed)
    train, val = demo_datasets(64, 32, 32, MEAN, STD, seed=0, grid=2)
    model = build_model("test_resnet", 10, head=head, decoder_embedding=32)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, ema_decay=0.9, workers=0, seed=0,
                      out_dir=str(out), progress=False, plot=False, max_steps_per_epoch=steps)
    args = {"model": "test_resnet", "num_classes": 10, "head": head, "decoder_embedding": 32,
            "image_size": 32, "mean": list(MEAN), "std": list(STD)}
    return MultiLabelTrainer(model, train, val, train.class_names, cfg, args, device="cpu",
                             log=lambda s: None)


def test_resume_is_exact(tmp_path):
    import shutil
    full = tiny_trainer(tmp_path / "full")
    full.fit(stop_after_epochs=1)
    shutil.copy(tmp_path / "full" / "last.pth", tmp_path / "epoch1.pth")
    full.fit()  # the same objects go on: the uninterrupted run
    ckpt = load_checkpoint(str(tmp_path / "epoch1.pth"))
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 and ckpt["class_names"][3] == "3"
    assert "fc.decoder.duplicate_pooling" in ckpt["model"]  # official layout under the head prefix
    assert ckpt["idx_to_class"][9] == "9"
    resumed = tiny_trainer(tmp_path / "resumed", seed=123)  # other initial weights and RNG state
    resumed.resume(str(tmp_path / "epoch1.pth"))
    resumed.fit()
    full_losses = [s[1] for s in full.history["steps"]]
    resumed_losses = [s[1] for s in resumed.history["steps"]]
    assert len(full_losses) == 4
    assert resumed_losses == full_losses  # the next steps' losses are exactly those of the full run
    for (k, a), b in zip(full.ema.module.state_dict().items(), resumed.ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [r["mAP"] for r in resumed.history["epochs"]] == [r["mAP"] for r in full.history["epochs"]]


def test_fast_head_trains_like_reference(tmp_path):
    """Same seed, dropout off (so both draw no random numbers): the same loss at every step."""
    losses = {}
    for head in ("reference", "fast"):
        trainer = tiny_trainer(tmp_path / head, epochs=1, head=head, steps=3)
        for m in trainer.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = 0.0
        trainer.fit()
        losses[head] = [s[1] for s in trainer.history["steps"]]
    np.testing.assert_allclose(losses["fast"], losses["reference"], rtol=2e-4)


def test_class_count_mismatch(tmp_path):
    model = build_model("test_resnet", 10, decoder_embedding=16)
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, model=model, class_names=[str(i) for i in range(10)], model_args={"model": "test_resnet"})
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError,
                       match=r"head has 10 classes .*fc\.decoder\.duplicate_pooling_bias.* 80 classes"):
        check_classes(ckpt, [f"c{i}" for i in range(80)])
    with pytest.raises(CheckpointError, match="class 0 is '0' in the checkpoint but 'zero'"):
        check_classes(ckpt, ["zero"] + [str(i) for i in range(1, 10)])
    # through the CLI: resuming a 10-class run on 3-class data fails before training, exit code 2
    csv_path, _ = write_csv_set(tmp_path, ["a", "b;c", "a"])
    rc = main(["train", "multilabel", "--train-csv", csv_path, "--val-csv", csv_path, "--model", "test_resnet",
               "--image-size", "32", "--decoder-embedding", "16", "--batch-size", "2", "--epochs", "1",
               "--workers", "0", "--resume", path, "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2


# bad data -------------------------------------------------------------------------------------
def write_png(path, color=(255, 0, 0)):
    from PIL import Image
    Image.new("RGB", (20, 16), color).save(path)


def write_coco(tmp_path, annotations, files=("a.png", "b.png", "c.png")):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for f in files:
        write_png(img_dir / f)
    data = {"images": [{"id": i + 1, "file_name": f} for i, f in enumerate(("a.png", "b.png", "c.png"))],
            "annotations": [{"id": 10 + i, "image_id": im, "category_id": c} for i, (im, c) in enumerate(annotations)],
            "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(img_dir), str(path)


def write_csv_set(tmp_path, label_cells):
    lines = ["path,labels"]
    for i, cell in enumerate(label_cells):
        write_png(tmp_path / f"i{i}.png", (i * 40 % 256, 0, 0))
        lines.append(f"i{i}.png,{cell}")
    path = tmp_path / "set.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path), [f"i{i}.png" for i in range(len(label_cells))]


def test_coco_loading(tmp_path):
    img_dir, js = write_coco(tmp_path, [(1, 1), (2, 3), (2, 1), (2, 1)])
    samples, names = load_coco(img_dir, js)
    assert names == ["cat", "dog"]
    assert [s.labels for s in samples] == [(0,), (0, 1)]  # image 3 has no annotation: left out
    ds = MultiLabelDataset(samples, names)
    img, target = ds[1]
    assert img.size == (20, 16) and target.tolist() == [1.0, 1.0]


def test_coco_unknown_category(tmp_path):
    img_dir, js = write_coco(tmp_path, [(1, 1), (2, 99)])
    with pytest.raises(DataError, match=r"instances\.json: annotation id 11 \(image id 2\) has category_id 99"):
        load_coco(img_dir, js)


def test_missing_and_corrupt_images(tmp_path):
    img_dir, js = write_coco(tmp_path, [(1, 1), (2, 3)], files=("a.png",))
    with pytest.raises(DataError, match=r"1 of 2 image files are missing:\n  instances\.json image id 2: .*b\.png"):
        load_coco(img_dir, js)
    (tmp_path / "images" / "b.png").write_bytes(b"this is not a PNG file")
    samples, names = load_coco(img_dir, js)
    ds = MultiLabelDataset(samples, names)
    with pytest.raises(BadImageError, match=r"instances\.json image id 2: cannot decode image .*b\.png"):
        ds[1]
    # through a DataLoader too: training stops, it does not skip the image
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: b)
    with pytest.raises(BadImageError, match="image id 2"):
        next(iter(loader))


def test_csv_errors(tmp_path):
    path, _ = write_csv_set(tmp_path, ["cat;dog", "", "dog"])
    with pytest.raises(DataError, match=r"set\.csv line 3: image 'i1\.png' has an empty label list"):
        load_csv(path)
    samples, names = load_csv(path, allow_empty=True)
    assert names == ["cat", "dog"] and [s.labels for s in samples] == [(0, 1), (), (1,)]
    path2, _ = write_csv_set(tmp_path, ["cat", "['dog', 'bird']"])
    with pytest.raises(DataError, match=r"line 3: unknown class 'bird'"):
        load_csv(path2, class_names=["cat", "dog"])
    with pytest.raises(DataError, match=r"set\.csv line 2: no split column"):
        load_csv(path2, split="train")
    (tmp_path / "split.csv").write_text("path,labels,split\ni0.png,cat,train\ni1.png,dog,val\ni0.png,dog,train\n")
    train, names = load_csv(str(tmp_path / "split.csv"), split="train")
    val, _ = load_csv(str(tmp_path / "split.csv"), class_names=names, split="val")
    assert names == ["cat", "dog"] and len(train) == 2 and [s.where for s in val] == ["split.csv line 3"]
    os.remove(tmp_path / "i0.png")
    with pytest.raises(DataError, match=r"set\.csv line 2: .*i0\.png"):
        load_csv(path2)


# the demo and predict -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # The CI-sized demo: 48 steps on 32 px mosaics of 2 x 2 cells (the full demo: 160 steps at 48 px).
    # One thread: on a shared 2-core runner, torch's two threads wait on each other (several x slower).
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "multilabel", "--demo", "--epochs", "3", "--train-size", "512", "--val-size", "128",
                   "--batch-size", "32", "--image-size", "32", "--grid", "2", "--decoder-embedding", "64",
                   "--threads", "1", "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def test_demo_beats_chance(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["best_mAP"] > summary["chance_mAP"] + 15, summary
    for name in ("log.csv", "log.json", "curves.png", "best.pth", "last.pth"):
        assert (demo_run / name).is_file(), name
    rows = (demo_run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,train_loss,lr,mAP,mAP_ema") and len(rows) == 4


def test_predict(demo_run, capsys):
    examples = sorted(str(p) for p in (demo_run / "examples").glob("*.png"))
    assert examples
    capsys.readouterr()
    rc = main(["predict", "--checkpoint", str(demo_run / "best.pth"), "--threshold", "0.0",
               "--top-k", "3", "--json", *examples[:2]])
    assert rc == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [d["image"] for d in lines] == examples[:2]
    assert all(len(d["classes"]) == 3 and d["classes"][0]["class"] in "0123456789" for d in lines)
    scores = [c["score"] for c in lines[0]["classes"]]
    assert scores == sorted(scores, reverse=True)
    rc = main(["predict", "--checkpoint", str(demo_run / "best.pth"), examples[0], "/no/such/image.png"])
    err = capsys.readouterr().err
    assert rc == 1 and "/no/such/image.png is missing" in err
