"""The fast paths of issue #9 against the plain ones: padded expert batches, oneDNN-packed weights (CPU
bf16), the batched decode attention, ping-pong micro-batches. Each must give what the plain path gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import experts.ffn as ffn
from emoe.spec import ACT_SWIGLU_CLAMPED, ExpertActivation, ModelSpec
from experts.ffn import (
    PackedExperts,
    expert_ffn_grouped,
    expert_ffn_packed,
    expert_ffn_reference,
    get_activation,
    packing_supported,
    silu_glu,
    use_padded,
)
from experts.store import ExpertStore
from router.model.attention import _sdpa, _sdpa_decode
from router.model.kv_cache import KVPool, PagedDecode, PagedSequenceCache
from router.model.layers import Linear

CPU_BF16 = packing_supported(torch.bfloat16, torch.device("cpu"))
needs_bf16 = pytest.mark.skipif(
    not CPU_BF16, reason="this CPU has no native bf16 (AVX512-BF16/AMX) in oneDNN"
)


def _experts(num_experts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_gu = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w_d = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    return w_gu.to(dtype), w_d.to(dtype)


def _biases(num_experts, hidden, inter, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    b_gu, b_d = (
        torch.randn(num_experts, 2 * inter, generator=g),
        torch.randn(num_experts, hidden, generator=g),
    )
    return (0.5 * b_gu).to(dtype), (0.5 * b_d).to(dtype)


SWIGLU = get_activation(
    ExpertActivation(ACT_SWIGLU_CLAMPED, alpha=1.702, limit=0.8)
)  # gpt-oss, clamping here


def _routing(n, k, num_experts, hidden, dtype, seed=1, elsewhere=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(n)])
    ids[torch.rand(n, k, generator=g) < elsewhere] = -1
    return x, ids, torch.rand(n, k, generator=g)


def test_padded_path_is_chosen_for_decode_and_not_for_few_experts():
    dense = torch.full((16,), 3)  # every expert has 3 tokens
    assert use_padded(dense, 48)
    few = torch.zeros(16, dtype=torch.long)
    few[:3] = 8  # 3 of 16 experts: the loop reads only their weights
    assert not use_padded(few, 24)
    skewed = torch.ones(16, dtype=torch.long)
    skewed[0] = 500  # padding every expert to 500 rows would be 16x the work
    assert not use_padded(skewed, 515)
    assert not use_padded(torch.zeros(16, dtype=torch.long), 0)


@pytest.mark.parametrize("gpt_oss", [False, True], ids=["silu", "swiglu-clamped+bias"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "loop"])
def test_both_grouped_paths_equal_the_reference(monkeypatch, padded, gpt_oss):
    monkeypatch.setattr(ffn, "use_padded", lambda counts, pairs: padded)
    w_gu, w_d = _experts(16, 64, 32, torch.float32)
    x, ids, w = _routing(40, 4, 16, 64, torch.float32)
    b_gu, b_d = _biases(16, 64, 32, torch.float32) if gpt_oss else (None, None)
    extra = dict(b_gate_up=b_gu, b_down=b_d, act=SWIGLU if gpt_oss else silu_glu)
    got = expert_ffn_grouped(x, ids, w, w_gu, w_d, **extra)
    want = expert_ffn_reference(x, ids, w, w_gu, w_d, **extra)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_bf16
def test_packed_experts_with_biases_and_clamped_swiglu():
    w_gu, w_d = _experts(8, 128, 64, torch.bfloat16)
    b_gu, b_d = _biases(8, 128, 64, torch.bfloat16)
    x, ids, w = _routing(24, 4, 8, 128, torch.bfloat16)
    got = expert_ffn_packed(x, ids, w, PackedExperts(w_gu, w_d, b_gu, b_d), SWIGLU)
    want = expert_ffn_reference(
        x.float(), ids, w, w_gu.float(), w_d.float(), b_gate_up=b_gu.float(), b_down=b_d.float(), act=SWIGLU
    )
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=3e-2)
    plain = expert_ffn_grouped(x, ids, w, w_gu, w_d, b_gate_up=b_gu, b_down=b_d, act=SWIGLU)
    torch.testing.assert_close(got.float(), plain.float(), atol=3e-2, rtol=2e-2)


@needs_bf16
def test_packed_experts_equal_the_plain_bf16_kernel():
    w_gu, w_d = _experts(8, 128, 64, torch.bfloat16)
    x, ids, w = _routing(24, 4, 8, 128, torch.bfloat16)
    got = expert_ffn_packed(x, ids, w, PackedExperts(w_gu, w_d))
    want = expert_ffn_reference(x.float(), ids, w, w_gu.float(), w_d.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    plain = expert_ffn_grouped(x, ids, w, w_gu, w_d)
    # same bf16 products and fp32 accumulation per row: at most one bf16 rounding step apart
    torch.testing.assert_close(got.float(), plain.float(), atol=2e-2, rtol=1e-2)


def test_packing_is_a_store_option_not_an_environment_variable(monkeypatch):
    """Issue 13, bug 3: the math read EMOE_PACKED_EXPERTS; now the store is told once, at construction."""
    monkeypatch.setenv("EMOE_PACKED_EXPERTS", "1")
    w_gu, w_d = _experts(4, 32, 16, torch.bfloat16)
    store = ExpertStore({0: range(4)}, {0: w_gu}, {0: w_d}, pack=False)
    x, ids, w = _routing(5, 2, 4, 32, torch.bfloat16)
    got = store.forward(0, x, ids, w)
    assert not store.packed and store.gate_up[0].device.type == "cpu"  # the plain weights stay in use
    torch.testing.assert_close(got, expert_ffn_grouped(x, ids, w, w_gu, w_d))


@needs_bf16
def test_store_packs_on_first_forward_and_keeps_its_size():
    w_gu, w_d = _experts(6, 64, 32, torch.bfloat16)
    store = ExpertStore({0: range(6)}, {0: w_gu}, {0: w_d})
    size = store.nbytes()
    x, ids, w = _routing(10, 2, 6, 64, torch.bfloat16)
    got = store.forward(0, x, ids, w)
    assert 0 in store.packed and store.gate_up[0].device.type == "meta"  # the plain copy is gone
    assert store.nbytes() == size
    plain = ExpertStore({0: range(6)}, {0: w_gu}, {0: w_d}, pack=False)
    torch.testing.assert_close(got.float(), plain.forward(0, x, ids, w).float(), atol=2e-2, rtol=1e-2)
    assert not plain.packed
    with pytest.raises(RuntimeError, match="packed"):
        store.to(torch.device("cpu"))


@needs_bf16
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_packed_linear_equals_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    lin = Linear(w, b)
    assert lin.packed is not None and lin.weight is None
    torch.testing.assert_close(lin(x).float(), F.linear(x, w, b).float(), atol=2e-2, rtol=1e-2)
    assert Linear(w.float()).packed is None  # fp32 keeps the plain kernel


@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
@pytest.mark.parametrize("window", [None, 5], ids=["full", "sliding-window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_attention_equals_per_sequence(window, dtype, sinks):
    """One query position per sequence over paged caches of different lengths: the batched path gives
    what attention per sequence gives (the reference path of prefill and of `Engine`)."""
    heads, kv_heads, dim, block = 8, 2, 16, 4
    lengths = [1, 6, 13, 3]
    pool = KVPool(num_layers=1, num_blocks=32, block_size=block)
    g = torch.Generator().manual_seed(0)
    tables, free = [], list(range(32))
    free.reverse()
    caches = []
    for n in lengths:  # fill each sequence's first n-1 positions, scattered over the pool's blocks
        table = [free.pop() for _ in range((n + block - 1) // block)]
        tables.append(table)
        c = PagedSequenceCache(pool, table, 0)
        if n > 1:
            k = torch.randn(n - 1, kv_heads, dim, generator=g).to(dtype)
            v = torch.randn(n - 1, kv_heads, dim, generator=g).to(dtype)
            c.append(0, k, v)
        caches.append(PagedSequenceCache(pool, table, n - 1))
    if pool.layers[0] is None:
        pool.storage(0, (torch.zeros(1, kv_heads, dim, dtype=dtype),) * 2)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    k_new = torch.randn(len(lengths), kv_heads, dim, generator=g).to(dtype)
    v_new = torch.randn(len(lengths), kv_heads, dim, generator=g).to(dtype)
    sink = 2 * torch.randn(heads, generator=g) if sinks else None  # gpt-oss: a logit per head

    want = []
    for i, n in enumerate(lengths):  # per sequence, on independent views of the same pool
        view = PagedSequenceCache(pool, tables[i], n - 1)
        kk, vv = view.append(0, k_new[i : i + 1], v_new[i : i + 1])
        mask = None
        if window is not None and n > window:
            mask = (torch.arange(n) > n - 1 - window).unsqueeze(0)
        want.append(_sdpa(q[i : i + 1], kk, vv, mask, dim**-0.5, sink))
    want = torch.cat(want)

    decode = PagedDecode(pool, caches)
    kk, vv = decode.append_and_read(0, k_new, v_new)
    assert kk.shape == (len(lengths) * kv_heads, max(lengths), dim)
    flat_k = pool.layers[0][0][decode.index]  # [B, L, Nkv, D], plain indexing of the pool
    assert torch.equal(kk, flat_k.transpose(1, 2).reshape(kk.shape))  # the same keys, head-major
    got = _sdpa_decode(q, kk, vv, decode, window, dim**-0.5, sink)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_bench_small_preset_is_the_issue_shape():
    from emoe.demo import demo_config

    spec = ModelSpec.from_config(demo_config("bench-small"))
    assert (spec.family, spec.num_layers, spec.hidden_size) == ("minimax_m2", 8, 1024)
    assert (spec.num_experts, spec.moe_intermediate_size, spec.top_k, spec.vocab_size) == (64, 512, 8, 32000)
