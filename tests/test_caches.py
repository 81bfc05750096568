"""The head's caches (eval queries, autocast weight copies, packed oneDNN weights) never serve
stale values."""
from __future__ import annotations

import pytest
import torch
from heads import disable_dropout_, make_pair
from helpers import assert_close


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


def _packed_and_cast(fast):
    return {n: fast.caches.held(n) for n in fast.caches.names() if n[0] in ("packed", "cast")}


@pytest.mark.usefixtures("op_by_op_eval")
@pytest.mark.parametrize("mode,dtype", [("onednn", None), ("onednn", torch.bfloat16), ("mkl", torch.bfloat16)])
def test_weight_copies_follow_every_change(monkeypatch, mode, dtype):
    """Packed oneDNN weights (fp32 and bf16) and autocast copies: made once per weight version,
    and never stale after an optimizer step, load_state_dict, an in-place edit, a dtype move or a
    train/eval switch."""
    from mldecoder_fast.ops import cpu_gemm
    monkeypatch.setitem(cpu_gemm._state, "mode", mode)
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
    ref, fast = make_pair(40, 8)
    x = torch.randn(2, 24, 3, 3)

    def agree(what):
        ref.eval(), fast.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out_ref, out_fast = ref(x), fast(x)
        assert_close(what, out_ref.float(), out_fast.float(), 1e-5 if dtype is None else 2e-2)
        return _packed_and_cast(fast)

    held = agree("before")
    kinds = {n[0] for n in held}
    assert kinds == ({"packed"} if dtype is None else {"cast"} | ({"packed"} if mode == "onednn" else set()))
    assert agree("again") == held                  # reused, not recomputed
    for m in (ref, fast):
        disable_dropout_(m).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().sum().backward()
        opt.step()
    after_step = agree("after optimizer.step")
    assert all(after_step[n] is not held[n] for n in held if n in after_step)
    other, _ = make_pair(40, 8)
    ref.load_state_dict(other.state_dict()), fast.load_state_dict(other.state_dict())
    agree("after load_state_dict")
    with torch.no_grad():
        for m in (ref, fast):
            m.decoder.layers[0].linear1.weight.mul_(-1.0)
            m.decoder.embed_standart.weight.add_(0.3)
    agree("after in-place edits")
    fast.train()
    assert len(fast.caches.names()) == 0           # a mode switch clears everything
    agree("after a train/eval switch")
    fast.double()
    assert len(fast.caches.names()) == 0           # so does a dtype move
    with torch.no_grad():
        assert_close("after .double()", ref.double()(x.double()), fast(x.double()), 1e-12)


def test_copies_of_the_head_start_with_empty_caches():
    import copy
    import io
    _, fast = make_pair(40, 8)
    fast.eval()
    with torch.no_grad():
        fast(torch.randn(2, 24, 3, 3))
    assert fast.caches.names()
    assert not copy.deepcopy(fast).caches.names()
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    assert not torch.load(buf, weights_only=False).caches.names()


@pytest.mark.parametrize("zsl", [0, 1])
def test_training_step_copies_refreshed_in_place(zsl):
    """bf16 autocast training: the fused step's weight copies are rewritten in their own memory
    after each optimizer step, and every step's output and gradients are exactly those of a copy
    of the head that derives them afresh. A backward of a graph made before the update fails
    autograd's in-place check instead of using the rewritten copies."""
    import copy
    torch.manual_seed(21)
    _, fast = make_pair(5 if zsl else 43, 8, zsl=zsl)
    disable_dropout_(fast).train()
    x = torch.randn(3, 24, 3, 3)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)

    def step(head):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
        out.float().square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}

    step(fast)
    opt.step()
    copies = next(v for n, v in ((n, fast.caches.held(n)) for n in fast.caches.names()) if n[0] == "train_step")
    addresses = [t.data_ptr() for t in copies if t is not None]
    for _ in range(2):
        fast.zero_grad(set_to_none=True)
        fresh = copy.deepcopy(fast)                    # empty caches: derives its copies anew
        out, grads = step(fast)
        out_fresh, grads_fresh = step(fresh)
        assert torch.equal(out, out_fresh)
        assert grads.keys() == grads_fresh.keys()
        for name, g in grads.items():
            assert torch.equal(g, grads_fresh[name]), name
        opt.step()
    now = next(v for n, v in ((n, fast.caches.held(n)) for n in fast.caches.names()) if n[0] == "train_step")
    assert [t.data_ptr() for t in now if t is not None] == addresses   # same memory, rewritten
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stale = fast(x)
    opt.step()                                         # parameters change before that backward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x)                                        # ... and the copies are refreshed
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.float().sum().backward()
