"""torchrun / DistributedDataParallel plumbing for the training recipes.

Everything here is PyTorch's own engine (``torch.distributed`` process groups, DDP, the samplers of
torch and timm); this module only decides how the recipes use it:

- ``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) and starts a process group: nccl on GPUs, gloo on CPUs. Without that environment it
  is a single process with no process group, and every helper below degrades to a no-op.
- ``wrap_ddp()``: DistributedDataParallel with the settings an ML-Decoder head needs (see below).
- The data order under several processes: ``samplers.py``.
- ``all_reduce_sum`` / ``all_gather_object``: metric reduction; ``is_main`` for rank-0 logging and
  checkpointing.

ML-Decoder heads under DDP: every parameter that requires a gradient takes part in every training
forward (the frozen query embedding has ``requires_grad=False``, which DDP leaves out of its
reducer), so ``find_unused_parameters=False`` is right. The heads have no buffers; the ZSL word
vectors are a plain attribute that every rank sets to the same tensor. ``MLDecoderFast``'s caches
(eval queries, low-precision and packed weight copies: ``mldecoder_fast/head/caches.py``) are keyed on
the parameters' storage and version counters; DDP's initial broadcast and every optimizer step
write the parameters in place and bump the versions, so each rank recomputes them after any change.
Evaluate with the unwrapped module (``unwrap(model)``): DDP's forward may broadcast buffers, which
deadlocks when ranks run different numbers of validation batches.
"""
from __future__ import annotations

import datetime
import os
import resource
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "destroy_distributed", "wrap_ddp", "unwrap", "shard_with_fsdp",
           "reshard_all",
           "drop_head_caches_each_forward",
           "all_reduce_sum", "all_reduce_max", "all_gather_object", "broadcast_object", "barrier",
           "peak_memory_mb", "free_port", "spawn_local"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None      # None: a single process without a process group

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes, or run as one process.

    ``device``: "cuda", "cpu" or None (CUDA when available). Under torchrun with CUDA each process
    takes the GPU ``LOCAL_RANK``. ``backend``: None picks nccl for CUDA, gloo for CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but torch sees no CUDA device")
    if want_cuda:
        if ":" in str(device or "") and world == 1:
            dev = torch.device(device)
        else:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world <= 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun "
                                   "(torchrun --nproc_per_node=N -m mldecoder_fast.cli train ...)")
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def destroy_distributed(info: DistInfo | None = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, info: DistInfo, **kwargs) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (already on ``info.device``); the model itself
    for a single process. Extra keyword arguments go to DDP."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    opts = dict(find_unused_parameters=False, gradient_as_bucket_view=True)
    opts.update(kwargs)
    if info.device.type == "cuda":
        opts.setdefault("device_ids", [info.device.index])
        opts.setdefault("output_device", info.device.index)
    return DDP(model, **opts)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (or the model itself)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def _clear_head_caches(module, args) -> None:
    module.clear_caches()


def drop_head_caches_each_forward(model: torch.nn.Module) -> int:
    """Make every ``MLDecoderFast`` in ``model`` drop all its caches (eval queries, weight copies)
    before every forward, for wrappers such as FSDP that change weights in place without bumping
    version counters. Returns the number of heads changed."""
    from ..head.fast import MLDecoderFast
    heads = [m for m in model.modules() if isinstance(m, MLDecoderFast)]
    for head in heads:
        if not getattr(head, "_drops_caches", False):
            head.register_forward_pre_hook(_clear_head_caches)
            head._drops_caches = True
    return len(heads)


def shard_with_fsdp(model: torch.nn.Module, info: DistInfo, reshard_after_forward: bool = True,
                    shard_head: bool = False) -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on a timm model with an ML-Decoder head.

    Each block of the backbone becomes one FSDP unit (the children of top-level ``Sequential`` /
    ``ModuleList`` containers such as ResNet's ``layer1``..``layer4`` blocks, ViT's ``blocks``;
    other top-level children with parameters as a whole), then the root takes what is left, the
    head included (``shard_head=True`` makes the head a unit of its own).

    FSDP writes the gathered weights into the same unsharded parameter objects without bumping
    their version counters, often at the same address, so ``MLDecoderFast``'s caches (keyed on
    storage and version) could serve values derived from older weights. A forward pre-hook
    therefore drops them before every forward of a sharded model (each forward then derives what
    it needs afresh: one [K, D] query computation per eval batch, weight copies where used).

    With ``reshard_after_forward=False`` a no-grad forward leaves the weights unsharded, and an
    optimizer step then changes only the shards: call ``reshard_all(model)`` after evaluating
    (FSDP's own behaviour, for every layer, not only the head; ``model.reshard()`` alone reshards
    only the root's group).
    """
    from torch.distributed.fsdp import fully_shard

    from ..head.fast import MLDecoderFast
    if not info.distributed:
        return model
    heads = [m for m in model.modules() if isinstance(m, MLDecoderFast)]
    head_ids = {id(m) for h in heads for m in h.modules()}
    kwargs = dict(reshard_after_forward=reshard_after_forward)
    for _, child in model.named_children():
        if id(child) in head_ids or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)):
            for block in child:
                if any(True for _ in block.parameters()):
                    fully_shard(block, **kwargs)
        else:
            fully_shard(child, **kwargs)
    drop_head_caches_each_forward(model)
    if shard_head:
        for head in heads:
            fully_shard(head, **kwargs)
    fully_shard(model, **kwargs)
    return model


def reshard_all(model: torch.nn.Module) -> None:
    """Reshard every FSDP unit of ``model`` (after no-grad forwards with reshard_after_forward=False)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# collectives -------------------------------------------------------------------------------------
def _comm_device(info: DistInfo) -> torch.device:
    return info.device if info.backend == "nccl" else torch.device("cpu")


def _all_reduce(values, info: DistInfo, op) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if info.distributed:
        t = t.to(_comm_device(info))
        dist.all_reduce(t, op=op)
    return t.cpu()


def all_reduce_sum(values, info: DistInfo) -> torch.Tensor:
    """Sum a list of numbers (or a tensor) over ranks; returns a float64 CPU tensor."""
    return _all_reduce(values, info, dist.ReduceOp.SUM)


def all_reduce_max(values, info: DistInfo) -> torch.Tensor:
    """Element-wise maximum over ranks; returns a float64 CPU tensor."""
    return _all_reduce(values, info, dist.ReduceOp.MAX)


def all_gather_object(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` for one process)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


# measurement and local launching -----------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA ``max_memory_allocated`` on a GPU (tensors only),
    the peak resident set size of the process on a CPU (everything: Python, libraries, tensors)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def free_port() -> int:
    """A free TCP port on localhost (for single-machine process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank, world_size, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
        # Tear down in step: free the DDP/FSDP objects (their gloo work and threads) first, and
        # let every rank arrive before the group goes; a rank destroying the group while another
        # still talks to it can abort the process ("terminate called without an active exception").
        import gc
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        destroy_distributed()


def spawn_local(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes on this machine with the
    torchrun environment set (localhost, a free port), so ``init_distributed()`` inside ``fn``
    joins a gloo group on CPU. ``fn`` must be importable (a module-level function)."""
    import torch.multiprocessing as mp
    mp.spawn(_spawn_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
