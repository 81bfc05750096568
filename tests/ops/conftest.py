import pytest
import torch


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill every torch.empty with NaN (as fla's tests do): an element a kernel forgot to write fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
