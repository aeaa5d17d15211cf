"""fastpath.py: the frozen blocks' output, stored once, gives the numbers the token ids give
(float32 and float16 storage, every pooling and strategy, the "gradual" boundary moving, bfloat16
autocast as on a GPU, deepened caches equal to built ones, the frozen work shared by several runs),
and length buckets visit every text once per epoch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

import classify
import fastpath
import report
from classify import GPTClassifier
from fastpath import PrefixCache
from test_classify import FEW, assert_close_to_scale, padded, random_token_lists, seeds, tiny_classifier, tiny_gpt

SEEDS = st.integers(min_value=0, max_value=2**32)


# --------------------------------------------------------------------------- fast path: the frozen-prefix cache


def loss_and_gradients(model, logits, labels):
    model.zero_grad()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


CACHED_CASES = [("head", 0), ("last-block", 0), ("last-2-blocks", 0), ("gradual", 0), ("gradual", 1), ("gradual", 2)]


@pytest.mark.parametrize("pooling", classify.POOLINGS)
@pytest.mark.parametrize(("strategy", "epoch"), CACHED_CASES)
def test_cached_prefix_gives_the_same_loss_and_gradients(strategy, epoch, pooling):
    model = tiny_classifier(pooling, n_layers=3)
    classify.apply_strategy(model, strategy, epoch=epoch)
    k = fastpath.frozen_prefix_length(model)
    lengths = [5, 1, 9, 3, 7, 2, 6]
    token_lists = random_token_lists(lengths, seed=6)
    cache = PrefixCache.build(model, token_lists, k, "cpu", batch_size=3)
    assert cache.start_block == k and cache.dtype == torch.float32 and len(cache) == len(lengths)
    one_position = pooling == "first" or (pooling in ("last", "special") and k == 3)
    stored = len(lengths) if one_position else sum(lengths) + len(lengths) * (pooling == "special")
    assert cache.nbytes == stored * 16 * 4

    indices = [2, 0, 5, 4]
    labels = torch.tensor([1, 0, 1, 0])
    hidden, cached_lengths = cache.batch(indices)
    assert hidden.dtype == torch.float32 and hidden.shape[0] == 4 and hidden.shape[2] == 16
    cached = loss_and_gradients(model, model(hidden, cached_lengths, start_block=k), labels)
    plain = loss_and_gradients(model, model(*padded([token_lists[i] for i in indices])), labels)
    torch.testing.assert_close(cached[0], plain[0], rtol=1e-5, atol=1e-6)
    assert cached[1].keys() == plain[1].keys() and cached[1]
    for name in plain[1]:
        assert_close_to_scale(cached[1][name], plain[1][name], name=name)


def test_cache_falls_back_to_float16_then_to_none_when_memory_is_short():
    model = tiny_classifier("mean", n_layers=3)
    classify.apply_strategy(model, "last-block")
    lengths = [5, 8, 2, 6]
    token_lists = random_token_lists(lengths, seed=7)
    fp32_bytes = sum(lengths) * 16 * 4
    half = PrefixCache.build(model, token_lists, 2, "cpu", memory_budget_bytes=fp32_bytes - 1)
    assert half is not None and half.dtype == torch.float16 and half.nbytes == fp32_bytes // 2
    hidden, lens = half.batch([0, 1, 2, 3])
    assert hidden.dtype == torch.float32
    torch.testing.assert_close(model(hidden, lens, start_block=2), model(*padded(token_lists)), rtol=1e-2, atol=1e-2)
    assert PrefixCache.build(model, token_lists, 2, "cpu", memory_budget_bytes=fp32_bytes // 2 - 1) is None


def test_cache_refuses_a_prefix_that_trains():
    model = tiny_classifier(n_layers=3)
    classify.apply_strategy(model, "last-2-blocks")
    with pytest.raises(ValueError, match="must be frozen"):
        PrefixCache.build(model, random_token_lists([3], seed=0), 2, "cpu")


def test_gradual_moves_the_cache_boundary_every_epoch():
    model = tiny_classifier(n_layers=3)
    token_lists = random_token_lists([4, 2, 6], seed=8)
    boundaries = []
    for epoch in range(3):
        classify.apply_strategy(model, "gradual", epoch=epoch)
        boundaries.append(fastpath.frozen_prefix_length(model))
        cache = PrefixCache.build(model, token_lists, boundaries[-1], "cpu")
        logits = model(*cache.batch([0, 1, 2]), start_block=cache.start_block)
        torch.testing.assert_close(logits, model(*padded(token_lists)), rtol=1e-5, atol=1e-5)
    assert boundaries == [3, 2, 1]


@pytest.mark.parametrize("pooling", classify.POOLINGS)
def test_fast_paths_run_under_bfloat16_autocast_as_on_a_gpu(pooling):
    model = tiny_classifier(pooling)
    classify.apply_strategy(model, "last-block")
    token_lists = random_token_lists([5, 9, 2], seed=9)
    reference = model(*padded(token_lists))
    cache = PrefixCache.build(model, token_lists, fastpath.frozen_prefix_length(model), "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uncached = model(*padded(token_lists))
        cached = model(*cache.batch([0, 1, 2]), start_block=cache.start_block)
        F.cross_entropy(cached.float(), torch.tensor([0, 1, 1])).backward()
    for logits in (uncached, cached):
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.05)  # bfloat16 keeps ~3 digits
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in classify.trainable_parameters(model))


def test_frozen_prefix_length_per_strategy():
    expected = {"head": 3, "last-block": 2, "last-2-blocks": 1, "last-3-blocks": None, "all": None, "lora": None}
    for strategy, k in expected.items():
        model = tiny_classifier(n_layers=3)
        classify.apply_strategy(model, strategy)
        assert fastpath.frozen_prefix_length(model) == k, strategy
    with_dropout = GPTClassifier(tiny_gpt(n_layers=3, drop_rate=0.1), 2)
    classify.apply_strategy(with_dropout, "head")
    assert fastpath.frozen_prefix_length(with_dropout) is None
    for epoch in range(6):
        model = tiny_classifier(n_layers=4)
        classify.apply_strategy(model, "gradual", epoch=epoch)
        assert fastpath.frozen_prefix_length(model) == (4 - epoch if epoch < 4 else None)


# --------------------------------------------------------------------------- frozen work shared by several runs


@FEW
@given(pooling=st.sampled_from(classify.POOLINGS), sdpa=st.booleans(), seed=seeds,
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=40), first=st.integers(1, 3))
def test_a_deepened_cache_is_the_built_one_to_the_last_bit(pooling, sdpa, seed, lengths, first):
    """The deeper boundary computed from the stored states of a shallower one (only the blocks
    between them run) equals the cache built from the token ids: exactly, not approximately, so
    a comparison's runs give the numbers separate runs give."""
    model = tiny_classifier(pooling, n_layers=4, seed=seed)
    model.gpt.set_fast_attention(sdpa)
    classify.apply_strategy(model, "head")  # every block frozen
    token_lists = random_token_lists(lengths, seed)
    base = PrefixCache.build(model, token_lists, first, "cpu", batch_size=8)
    for deeper in range(first + 1, 5):
        built = PrefixCache.build(model, token_lists, deeper, "cpu", batch_size=8)
        deepened = base.deepen(model, deeper, batch_size=8)
        assert deepened.start_block == deeper and deepened.order == built.order
        assert torch.equal(deepened.lengths, built.lengths) and torch.equal(deepened.offsets, built.offsets)
        assert torch.equal(deepened.states, built.states)


def test_only_a_float32_cache_of_every_position_deepens():
    model = tiny_classifier("last", n_layers=3)
    classify.apply_strategy(model, "head")
    token_lists = random_token_lists([5, 8, 2, 6], seed=7)
    half = PrefixCache.build(model, token_lists, 1, "cpu", memory_budget_bytes=21 * 16 * 4 - 1)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="float32"):
        half.deepen(model, 2)
    last_only = PrefixCache.build(model, token_lists, 3, "cpu")  # every block frozen: the last position alone
    with pytest.raises(ValueError, match="must be deeper"):
        last_only.deepen(model, 3)
    full = PrefixCache.build(model, token_lists, 2, "cpu")
    with pytest.raises(ValueError, match="must be deeper"):
        full.deepen(model, 1)
    classify.apply_strategy(model, "last-2-blocks")  # blocks 1 and 2 now train
    with pytest.raises(ValueError, match="must be frozen"):
        PrefixCache.build(model, token_lists, 1, "cpu").deepen(model, 2)


@pytest.mark.parametrize("epochs", [1, 3, 6])
def test_planned_prefix_lengths_are_those_training_asks_for(epochs):
    strategies = ["head", "last-block", "last-2-blocks", "last-4-blocks", "all", "gradual", "lora"]
    for strategy in strategies:
        asked = set()
        for epoch in range(epochs if strategy == "gradual" else 1):
            model = tiny_classifier(n_layers=4)
            classify.apply_strategy(model, strategy, epoch=epoch, lora_rank=2)
            asked.add(fastpath.frozen_prefix_length(model))
        planned = fastpath.planned_prefix_lengths(tiny_classifier(n_layers=4), [strategy], epochs)
        assert set(planned) == asked - {None}, strategy
    with_dropout = GPTClassifier(tiny_gpt(n_layers=4, drop_rate=0.1), 2)
    assert fastpath.planned_prefix_lengths(with_dropout, strategies, epochs) == []


@pytest.mark.parametrize("pooling", classify.POOLINGS)
def test_runs_take_the_shared_frozen_work_and_get_what_they_would_build(pooling):
    datasets = {name: fastpath.data.ClassificationDataset(random_token_lists(lengths, seed), [0, 1] * (len(lengths) // 2))
                for seed, (name, lengths) in enumerate([("train", [5, 1, 9, 3, 7, 2]), ("test", [4, 6])])}
    frozen = tiny_classifier(pooling, n_layers=3)
    classify.apply_strategy(frozen, "head")
    lengths = fastpath.planned_prefix_lengths(frozen, ["head", "last-block", "last-2-blocks"], epochs=1)
    shared = fastpath.share_frozen_work(frozen, datasets, lengths, torch.device("cpu"))
    assert lengths == [1, 2, 3] and len(shared.steps) == 3 and "embeddings and block 0" in shared.steps[0]
    assert "block 1 over" in shared.steps[1] and shared.nbytes > 0
    for strategy in ("head", "last-block", "last-2-blocks"):
        model = tiny_classifier(pooling, n_layers=3)
        classify.apply_strategy(model, strategy)
        fresh = {name: fastpath.SplitInputs(dataset) for name, dataset in datasets.items()}
        shelved = {name: fastpath.SplitInputs(dataset, shelf=shared.caches[name]) for name, dataset in datasets.items()}
        built = fastpath.refresh_caches(model, fresh, torch.device("cpu"))
        taken = fastpath.refresh_caches(model, shelved, torch.device("cpu"))
        assert taken.shared and not built.shared and "done once" in report.describe_cache(taken)
        assert (taken.start_block, taken.nbytes, taken.dtype) == (built.start_block, built.nbytes, built.dtype)
        for name in datasets:
            assert shelved[name].cache is shared.caches[name][taken.start_block]  # taken, not recomputed
            assert torch.equal(shelved[name].cache.states, fresh[name].cache.states)
