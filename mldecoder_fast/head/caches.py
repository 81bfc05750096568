"""What an ``MLDecoderFast`` head derives from its parameters and keeps between calls.

Three kinds of entries, each computed once per version of the tensors it is derived from:

- the eval queries (T1, q and the key-folded queries of the batch-independent query path);
- low-precision copies of the weights for autocast (bf16/fp16 casts made once per weight
  version instead of once per call);
- oneDNN-packed (reordered) weights for the CPU eval forward.

An entry is keyed on the source tensors' identity, storage address, version counter, dtype,
device and shape: in-place updates (optimizer steps, ``load_state_dict``'s copies, ``mul_``)
bump the version and so refresh it. Writes that bypass version counters (``p.data`` edits,
FSDP re-materialising parameters in place) are invisible: the head clears its caches on
``.to()``/dtype moves, ``load_state_dict`` and train/eval switches, and ``clear_caches()``
does it on demand. Nothing is cached (every call computes afresh) while ``enabled`` is False or
while torch.compile traces (the graph must compute the values itself). While a CUDA graph is being
captured, valid entries are read (the graph then reads them where they are: ``cuda_graphed`` derives
them in its warm-up, before the capture, and keeps them alive with its graphs, so neither
``clear()`` nor a later refresh frees what a replay reads; it recaptures when the weights change)
but nothing new is stored (a tensor made during capture holds no values until the graph replays).

The cached tensors are ordinary allocations of the head's device: memory measurements see them.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch


def tensor_key(t: torch.Tensor) -> tuple:
    """What identifies one version of a tensor's values."""
    return (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


_registrations = [0]


def _count_registration(module, name, value) -> None:
    _registrations[0] += 1


# Any parameter or buffer (re)registered anywhere in the process, e.g. a parameter replaced by
# assigning a new one: ``get_by_versions`` then lists its sources again.
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)


def capturing() -> bool:
    """Whether a CUDA graph is being captured on this stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class HeadCaches:
    """One head's derived tensors: ``get(name, sources, compute)`` returns ``compute()``'s
    value, computed once per version of ``sources``."""

    def __init__(self) -> None:
        self.enabled = True
        self._entries: dict = {}
        self._checks: dict = {}   # name -> what get_by_versions compares between calls

    def get(self, name: Hashable, sources: Sequence[torch.Tensor], compute: Callable[[], object],
            refresh: Callable[[object], object] | None = None):
        """``refresh(stale)``, where given, makes the new value in the stale one's memory (on the
        CPU a large copy into fresh memory pays a page fault per 4 KiB page: the 67 MB cast of an
        ImageNet-21K group-FC weight took 9-14 ms fresh, 2-3 ms into memory in use). An autograd
        graph that saved the stale tensors and runs its backward after the refresh then fails
        autograd's in-place check, as one that saved the parameters themselves does after an
        optimizer step."""
        if not self.enabled or torch.compiler.is_compiling():
            return compute()
        key = tuple(tensor_key(t) for t in sources)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        if capturing():
            return compute()
        # Drop the stale value before computing the new one: never two versions held at once.
        self._entries.pop(name, None)
        value = compute() if entry is None or refresh is None else refresh(entry[1])
        self._entries[name] = (key, value)
        return value

    def get_by_versions(self, name: Hashable, sources: Callable[[], Sequence[torch.Tensor]],
                        compute: Callable[[], object], same: Sequence[object] = ()):
        """``get(name, sources(), compute)`` for a hot path: ``sources()`` (e.g. a walk over a
        module's parameters) and the full keys are made only when something may have changed.
        Between such calls a value is returned after comparing the sources' version counters and
        storage addresses, the process's count of parameter and buffer registrations (a parameter
        replaced by assignment) and the identity of the objects ``same`` (e.g. a plain tensor
        attribute that can be reassigned)."""
        check = self._checks.get(name)
        if (check is not None and self.enabled and check[0] == _registrations[0] and len(check[1]) == len(same)
                and all(a is b for a, b in zip(check[1], same, strict=True))
                and check[3] == tuple((t._version, t.data_ptr()) for t in check[2])
                and self._entries.get(name, (None, None))[1] is check[4]):
            return check[4]
        self._checks.pop(name, None)
        listed = list(sources())
        value = self.get(name, listed, compute)
        if self._entries.get(name, (None, None))[1] is value:    # stored (not while tracing or capturing)
            self._checks[name] = (_registrations[0], tuple(same), tuple(listed),
                                  tuple((t._version, t.data_ptr()) for t in listed), value)
        return value

    def cast(self, name: Hashable, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``weight`` (detached) in ``dtype``; the weight itself when it already has that dtype."""
        if weight.dtype == dtype:
            return weight.detach()
        return self.get(("cast", name, dtype), (weight,), lambda: weight.detach().to(dtype))

    def nbytes(self, exclude: Sequence[torch.Tensor] = ()) -> int:
        """Bytes of the memory the entries hold, each storage once, not counting the storages of
        ``exclude`` (the parameters: an entry may be a parameter itself or a view of one)."""
        seen = {_storage_key(t) for t in exclude}
        total = 0
        for t in _tensors([value for _, value in self._entries.values()]):
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes() if t.layout == torch.strided else t.numel() * t.element_size()
        return total

    def clear(self) -> None:
        self._entries.clear()
        self._checks.clear()

    def held(self, name: Hashable):
        """The value held under ``name`` (of whichever version it was computed for), or None."""
        entry = self._entries.get(name)
        return None if entry is None else entry[1]

    def names(self) -> list:
        return list(self._entries)

    def values(self) -> list:
        """Every value held (for ``cuda_graphed``, which keeps what its graphs read alive)."""
        return [value for _, value in self._entries.values()]

    # Copies of the head (deepcopy for EMA, pickling with torch.save) start with empty caches:
    # the entries are keyed on the original's tensors, and packed oneDNN tensors do not pickle.
    def __getstate__(self) -> dict:
        return {"enabled": self.enabled}

    def __setstate__(self, state: dict) -> None:
        self.enabled = state["enabled"]
        self._entries = {}
        self._checks = {}


def _storage_key(t: torch.Tensor) -> tuple:
    if t.layout != torch.strided:        # oneDNN's opaque tensors have no storage to share
        return ("opaque", id(t))
    return (t.device, t.untyped_storage().data_ptr())


def _tensors(value):
    """The tensors in a cached value (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
