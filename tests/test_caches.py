"""The head's caches (eval queries, autocast weight copies, packed oneDNN weights) never serve
stale values."""
from __future__ import annotations

import torch

from helpers import assert_close
from heads import make_pair


def _agree(ref, fast, x, what):
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_close(what, ref(x), fast(x), 1e-5)


def test_cache_reused_and_refreshed_after_optimizer_step():
    ref, fast = make_pair(40, 8)
    x = torch.randn(2, 24, 3, 3)
    _agree(ref, fast, x, "before")
    cached = fast.caches.held("queries")
    assert cached is not None
    _agree(ref, fast, x, "again")
    assert fast.caches.held("queries") is cached  # no recomputation without a change
    for m in (ref, fast):  # an in-place optimizer update of the query-path parameters
        m.eval()  # (no dropout: both heads must take the same step)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().sum().backward()
        opt.step()
    _agree(ref, fast, x, "after optimizer.step")
    assert fast.caches.held("queries") is not cached


def test_cache_refreshed_after_load_state_dict_and_frozen_query_edit():
    ref, fast = make_pair(40, 8)
    x = torch.randn(2, 24, 3, 3)
    _agree(ref, fast, x, "before")
    other, _ = make_pair(40, 8)
    ref.load_state_dict(other.state_dict()), fast.load_state_dict(other.state_dict())
    _agree(ref, fast, x, "after load_state_dict")
    with torch.no_grad():  # the frozen query embedding edited in place
        for m in (ref, fast):
            m.decoder.query_embed.weight.mul_(1.5)
    _agree(ref, fast, x, "after editing query_embed")


def test_cache_refreshed_after_dtype_move():
    ref, fast = make_pair(40, 8)
    x = torch.randn(2, 24, 3, 3)
    _agree(ref, fast, x, "fp32")
    ref.double(), fast.double()
    ref.eval(), fast.eval()
    with torch.no_grad():
        out = fast(x.double())
        assert out.dtype == torch.float64
        assert_close("fp64", ref(x.double()), out, 1e-12)


def test_cache_refreshed_for_new_word_vectors():
    ref, fast = make_pair(1, zsl=1)
    x = torch.randn(2, 24, 3, 3)
    for n in (4, 6, 4):
        v = torch.randn(n, 300)
        ref.set_word_vectors(v), fast.set_word_vectors(v)
        _agree(ref, fast, x, f"word vectors n={n}")
    with torch.no_grad():
        v.mul_(2.0)  # word vectors edited in place
    _agree(ref, fast, x, "word vectors edited in place")


def test_eval_with_grad_reaches_query_path_parameters():
    """Eval mode with autograd on (e.g. fine-tuning with frozen dropout) must not use a detached
    cached q: the query-path parameters get their gradients."""
    ref, fast = make_pair(40, 8)
    x = torch.randn(2, 24, 3, 3)
    ref.eval(), fast.eval()
    with torch.no_grad():
        fast(x)  # fill the cache first
    ref(x).sum().backward()
    fast(x).sum().backward()
    for name in ("decoder.layers.0.norm1.weight", "decoder.layers.0.multihead_attn.in_proj_weight"):
        g_ref = dict(ref.named_parameters())[name].grad
        g_fast = dict(fast.named_parameters())[name].grad
        assert g_fast is not None
        assert_close(name, g_ref, g_fast, 1e-4)


def test_writes_behind_version_counters():
    """p.data edits do not bump version counters: a mode switch or clear_caches() refreshes,
    and caches.enabled = False never caches."""
    ref, fast = make_pair(40, 8)
    x = torch.randn(2, 24, 3, 3)
    _agree(ref, fast, x, "before")
    for m in (ref, fast):
        m.decoder.layers[0].norm1.weight.data.mul_(3.0)
    fast.train()
    _agree(ref, fast, x, "after .data edit and a train/eval switch")
    for m in (ref, fast):
        m.decoder.layers[0].norm1.bias.data.add_(1.0)
    fast.clear_caches()
    _agree(ref, fast, x, "after .data edit and clear_caches()")
    fast.caches.enabled = False
    fast(x)  # fill nothing
    for m in (ref, fast):
        m.decoder.query_embed.weight.data.mul_(-1.0)
    _agree(ref, fast, x, "after .data edit with caching off")
