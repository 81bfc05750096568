"""DDP with 2 gloo processes on CPU (localhost): MLDecoderFast gradients equal single-process
gradients on the same global batch, the head's caches are right on every rank after optimizer
steps, and the sampler / reduction helpers count every sample once."""
from __future__ import annotations

import copy

import pytest
import torch
from heads import disable_dropout_
from torch import nn

from mldecoder_fast import MLDecoderFast
from mldecoder_fast.train import distributed as D
from mldecoder_fast.train import samplers as S

WORLD = 2
GLOBAL_BATCH = 8




def _models():
    """A tiny timm backbone + MLDecoderFast, and a ZSL MLDecoderFast head on tokens, same weights on
    every rank (seeded), dropout off so that one process and two can be compared exactly."""
    import timm

    from mldecoder_fast.interop.timm_head import add_ml_decoder_head
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False)
    add_ml_decoder_head(net, num_classes=37, num_of_groups=5, decoder_embedding=32, fast=True)
    net.train()
    for m in net.modules():           # per-rank BatchNorm statistics differ from the full batch's:
        if isinstance(m, nn.BatchNorm2d):  # freeze them (SyncBatchNorm needs GPUs)
            m.eval()
    zsl = MLDecoderFast(num_classes=1, decoder_embedding=32, initial_num_features=24, zsl=1)
    zsl = disable_dropout_(zsl).double()
    zsl.set_word_vectors(torch.randn(11, 300, dtype=torch.float64))
    return disable_dropout_(net).double(), zsl


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    y = (torch.rand(GLOBAL_BATCH, 37, generator=g) < 0.2).double()
    tok = torch.randn(GLOBAL_BATCH, 6, 24, generator=g, dtype=torch.float64)
    yz = (torch.rand(GLOBAL_BATCH, 11, generator=g) < 0.3).double()
    return x, y, tok, yz


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world):
    info = D.init_distributed("cpu")
    assert info.distributed and info.world_size == world and info.backend == "gloo"
    net, zsl = _models()
    x, y, tok, yz = _data()
    loss_fn = nn.BCEWithLogitsLoss()       # mean over the local batch: DDP averages over ranks

    # single-process reference on the whole global batch
    ref_net, ref_zsl = copy.deepcopy(net), copy.deepcopy(zsl)
    loss_fn(ref_net(x), y).backward()
    loss_fn(ref_zsl(tok), yz).backward()
    ref_grads = [_grads(ref_net), _grads(ref_zsl)]

    # DDP on this rank's half
    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    ddp_net, ddp_zsl = D.wrap_ddp(net, info), D.wrap_ddp(zsl, info)
    loss_fn(ddp_net(x[lo:hi]), y[lo:hi]).backward()
    loss_fn(ddp_zsl(tok[lo:hi]), yz[lo:hi]).backward()
    for name, ref, model in (("backbone+head", ref_grads[0], net), ("zsl head", ref_grads[1], zsl)):
        got = _grads(model)
        assert set(got) == set(ref), f"{name}: parameters with gradients differ: {set(got) ^ set(ref)}"
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-9, atol=1e-12), (
                f"rank {rank} {name} {k}: DDP gradient differs from the single-process one "
                f"(max diff {(got[k] - ref[k]).abs().max():.3e})")

    # The head's caches: fill them, take an optimizer step, evaluate again on every rank.
    head = net.get_classifier()
    assert isinstance(head, MLDecoderFast)
    for model, ref in ((net, ref_net), (zsl, ref_zsl)):
        model.eval(), ref.eval()
        with torch.no_grad():
            before = model(x if model is net else tok)
        opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ref))
        opt.step(), ref_opt.step()
        with torch.no_grad():
            after = model(x if model is net else tok)
            expected = ref(x if model is net else tok)
        assert not torch.allclose(before, after), "the optimizer step did not change the eval output"
        assert torch.allclose(after, expected, rtol=1e-9, atol=1e-12), (
            f"rank {rank}: eval output after an optimizer step differs from the single-process model "
            "(stale head cache?)")
        every = D.all_gather_object(after, info)
        assert all(torch.equal(every[0], e) for e in every), "ranks disagree on the eval output"

    _fsdp_checks(rank, info, x, y)

    # metric helpers: every validation position once, sums over ranks
    ds = list(range(11))
    mine = list(S.EvalShardSampler(ds, rank, world))
    everyone = sorted(sum(D.all_gather_object(mine, info), []))
    assert everyone == ds
    total = D.all_reduce_sum([len(mine), 1.0], info)
    assert total.tolist() == [11.0, float(world)]


def _fsdp_checks(rank, info, x, y):
    """FSDP2 on the backbone blocks (root holds the head): one training step equals the
    single-process step, and eval after an optimizer step sees the new weights, also when FSDP
    puts the new values at the old address with the old version counter (reshard + unshard)."""
    net, _ = _models()
    ref = copy.deepcopy(net)
    D.shard_with_fsdp(net, info, reshard_after_forward=False)
    lo, hi = rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (net, ref))
    nn.functional.binary_cross_entropy_with_logits(net(x[lo:hi]), y[lo:hi]).backward()
    nn.functional.binary_cross_entropy_with_logits(ref(x), y).backward()
    net.eval(), ref.eval()
    with torch.no_grad():
        before = net(x)
    D.reshard_all(net)  # needed with reshard_after_forward=False before the optimizer step
    opt.step(), ref_opt.step()
    with torch.no_grad():
        after, expected = net(x), ref(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, rtol=1e-9, atol=1e-12), (
        f"rank {rank}: FSDP eval after a step differs from one process by "
        f"{(after - expected).abs().max():.3e}")


def test_ddp_gradients_and_head_caches_match_single_process():
    D.spawn_local(_ddp_worker, WORLD)


@pytest.mark.parametrize("repeats", [1, 3])
def test_epoch_sampler_global_order_does_not_depend_on_world_size(repeats):
    """Step s of W ranks covers the same samples (with the same augmentation keys) for W = 1, 2, 4,
    and skipping k steps resumes exactly after the samples already seen."""
    data = list(range(64))
    global_batch = 8

    def steps(world, skip=0):
        per_rank = []
        for r in range(world):
            s = S.EpochSampler(data, global_batch // world, r, world, seed=3, repeats=repeats)
            s.set_epoch(2, skip)
            items = list(s)
            b = global_batch // world
            per_rank.append([items[i:i + b] for i in range(0, len(items), b)])
        return [sorted(sum((rank[i] for rank in per_rank), [])) for i in range(len(per_rank[0]))]

    one = steps(1)
    assert len(one) >= 4
    for world in (2, 4):
        many = steps(world)
        n = min(len(one), len(many))
        assert n >= len(one) - 1
        assert many[:n] == one[:n]
        assert steps(world, skip=3)[:n - 3] == one[3:n]
    keys = [k for step in one for _, k in step]
    assert len(set(keys)) == len(keys), "augmentation keys repeat inside an epoch"


def test_keyed_dataset_seeds_augmentation_and_keeps_caller_rng():
    class Noise:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    ds = S.KeyedDataset(Noise(), seed=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = ds[(1, (0, 17))]
    assert torch.equal(torch.get_rng_state(), state), "the caller's generator moved"
    assert torch.equal(a, ds[(1, (0, 17))])
    assert not torch.equal(a, ds[(1, (0, 18))]) and not torch.equal(a, ds[(1, (1, 17))])


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert not info.distributed and info.is_main and info.world_size == 1
    m = nn.Linear(2, 2)
    assert D.wrap_ddp(m, info) is m and D.unwrap(m) is m
    assert D.all_gather_object(3, info) == [3]
    assert D.all_reduce_sum([1, 2], info).tolist() == [1.0, 2.0]
    assert D.peak_memory_mb(torch.device("cpu")) > 0


def test_head_caches_dropped_for_writes_that_keep_the_version():
    """FSDP writes gathered weights into the same parameter objects without bumping their version
    counters; with ``drop_head_caches_each_forward`` the eval output follows such writes."""
    head = MLDecoderFast(num_classes=20, num_of_groups=4, decoder_embedding=32,
                         initial_num_features=16).eval()
    x = torch.randn(3, 5, 16)
    assert D.drop_head_caches_each_forward(nn.Sequential(head)) == 1
    with torch.no_grad():
        head(x)
        # a weight of the query path (cached queries) and one of the input path (cached packed or
        # low-precision copies), each written in place with its version counter untouched
        for w in (head.decoder.layers[0].norm1.weight, head.decoder.layers[0].linear1.weight):
            version = w._version
            w.data.mul_(3.0)
            assert w._version == version
        fresh = MLDecoderFast(num_classes=20, num_of_groups=4, decoder_embedding=32,
                              initial_num_features=16).eval()
        fresh.load_state_dict(head.state_dict())
        assert torch.allclose(head(x), fresh(x), atol=1e-6)


class _Float64(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x.double(), y.double()


def _multilabel_trainer(info, batch_size, out):
    """The multi-label recipe's trainer on demo mosaics, one optimizer step of ``batch_size`` per
    process, in float64 with dropout off (timm's test_vit: LayerNorm, no BatchNorm statistics)."""
    from mldecoder_fast.train.models import build_model
    from mldecoder_fast.train.multilabel import MultiLabelTrainer, TrainConfig
    from mldecoder_fast.train.synthetic.digits import demo_datasets
    train, val = demo_datasets(32, 16, 32, (0.5,) * 3, (0.5,) * 3, seed=0, grid=2)
    torch.manual_seed(0)
    model = disable_dropout_(build_model("test_vit", 10, decoder_embedding=32,
                                         model_kwargs={"img_size": 32})).double()
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, ema_decay=0.9, workers=0,
                      max_steps_per_epoch=1, out_dir=out, progress=False, plot=False,
                      save_checkpoints=False)
    return MultiLabelTrainer(model, _Float64(train), _Float64(val), train.class_names, cfg, {},
                             info=info, log=lambda m: None)


def _multilabel_ddp_worker(rank, world, out):
    info = D.init_distributed("cpu")
    ref = _multilabel_trainer(D.DistInfo(), GLOBAL_BATCH, f"{out}/single{rank}")
    ref.fit()
    ddp = _multilabel_trainer(info, GLOBAL_BATCH // world, f"{out}/ddp")
    ddp.fit()
    ref_grads, got = _grads(ref.model), _grads(ddp.model)
    assert set(got) == set(ref_grads) and got
    for k in ref_grads:
        assert torch.allclose(got[k], ref_grads[k], rtol=1e-9, atol=1e-12), (
            f"rank {rank} {k}: DDP gradient differs from the single-process one "
            f"(max diff {(got[k] - ref_grads[k]).abs().max():.3e})")
    # the logged loss is the global batch's (summed over ranks, as the recipe sums over the batch)
    assert ddp.history["steps"][0][1] == pytest.approx(ref.history["steps"][0][1], rel=1e-6)
    # validation gathers every image once, in dataset order: the same mAP as one process
    assert ddp.history["epochs"][0]["mAP"] == pytest.approx(ref.history["epochs"][0]["mAP"], rel=1e-9)


def test_multilabel_recipe_under_ddp_has_single_process_gradients(tmp_path):
    """``train multilabel`` under torchrun: 2 gloo processes with half the batch each compute the
    single-process gradients of the whole batch (float64, dropout off) and the same mAP."""
    pytest.importorskip("sklearn")
    D.spawn_local(_multilabel_ddp_worker, WORLD, str(tmp_path))
