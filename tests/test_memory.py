"""MemoryState (fixed-slot short-term pool) and LongTermMemory bookkeeping."""
import pytest
import torch

from mplus_lightning import LongTermMemory, MemoryState

L, N, D, K, S = 3, 12, 4, 3, 2


def pool(ltm_capacity=None):
    rows = torch.arange(L * N * D, dtype=torch.float32).reshape(L, N, D)
    ltm = LongTermMemory(L, D, S, ltm_capacity) if ltm_capacity else None
    return MemoryState.from_rows(rows, K, ltm=ltm)


def fake_keys(rows):
    return rows[..., :S] * 10


def test_commit_replaces_exactly_k_rows_per_layer_independently_and_survivors_keep_order():
    mem = pool()
    before = mem.ordered_rows().clone()
    delta = -torch.ones(L, K, D) * torch.arange(1, K + 1)[None, :, None]
    evict = torch.tensor([[0, 5, 11], [1, 2, 3], [4, 8, 9]])
    evicted, _ = mem.commit(delta, evict_ranks=evict)
    after = mem.ordered_rows()
    for l in range(L):
        keep = [r for r in range(N) if r not in evict[l].tolist()]
        assert torch.equal(after[l, : N - K], before[l, keep]), "survivors keep their relative order"
        assert torch.equal(after[l, N - K:], delta[l]), "the new block is the newest"
        assert torch.equal(evicted[l], before[l, evict[l]])
        assert sorted(mem.ranks[l].tolist()) == list(range(N))
    # only K slots were written per layer: the other slots still hold the same tensors
    changed = (mem.rows != pool().rows).any(-1).sum(1)
    assert changed.tolist() == [K] * L


def test_random_evictions_differ_between_layers_and_follow_randperm_draws():
    mem = pool()
    g = torch.Generator().manual_seed(3)
    drop = mem.sample_evictions(g)
    g2 = torch.Generator().manual_seed(3)
    expected = torch.stack([torch.randperm(N, generator=g2)[N - K:].sort().values for _ in range(L)])
    assert torch.equal(drop, expected)
    assert not all(torch.equal(drop[0], drop[l]) for l in range(1, L))
    shared = mem.sample_evictions(torch.Generator().manual_seed(3), per_layer=False)
    assert all(torch.equal(shared[0], shared[l]) for l in range(L))


def test_ages_grow_by_k_per_commit_and_new_block_is_youngest():
    mem = pool()
    ages0 = mem.ages.clone()
    assert torch.equal(mem.ages[0], torch.arange(N - 1, -1, -1)), "loaded rows get rank-derived ages"
    evict = torch.tensor([[0, 1, 2]] * L)
    mem.commit(torch.zeros(L, K, D), evict_ranks=evict)
    slots = mem.slots_in_rank_order()
    new_ages = torch.gather(mem.ages, 1, slots)
    assert new_ages[0, N - K:].tolist() == [K - 1 - i for i in range(K)]
    assert torch.equal(new_ages[:, : N - K], torch.gather(ages0, 1, torch.argsort(pool().ranks, 1))[:, K:] + K)
    # ages decrease strictly with rank: ages and ranks stay consistent
    assert bool((new_ages[:, 1:] < new_ages[:, :-1]).all())


def test_evicted_rows_reach_long_term_memory_with_keys_and_ages_until_capacity_then_oldest_leave():
    mem = pool(ltm_capacity=2 * K + 1)
    first = mem.ordered_rows()[:, :K].clone()
    first_ages = torch.gather(mem.ages, 1, mem.slots_in_rank_order())[:, :K] + K
    mem.commit(torch.zeros(L, K, D), evict_ranks=torch.arange(K).expand(L, K), keys_fn=fake_keys)
    ltm = mem.ltm
    assert len(ltm) == K
    for l in range(L):
        rows, keys, ages = ltm.view(l)
        assert torch.equal(rows, first[l]) and torch.equal(keys, fake_keys(first[l]))
        assert torch.equal(ages, first_ages[l])
    mem.commit(torch.ones(L, K, D), evict_ranks=torch.arange(K).expand(L, K), keys_fn=fake_keys)
    assert len(ltm) == 2 * K, "nothing is lost before capacity"
    assert torch.equal(ltm.view(0)[2][:K], first_ages[0] + K), "stored ages keep growing"
    oldest_before = ltm.view(0)[2].max().item()
    mem.commit(2 * torch.ones(L, K, D), evict_ranks=torch.arange(K).expand(L, K), keys_fn=fake_keys)
    assert len(ltm) == 2 * K + 1, "capacity bounds the store"
    for l in range(L):
        ages = ltm.view(l)[2]
        # the 2 oldest of the first batch left; everything kept is younger than what left
        assert ages.max().item() < oldest_before + K
        assert ages.numel() == 2 * K + 1


def test_long_term_memory_grows_geometrically_not_per_add():
    ltm = LongTermMemory(1, 2, 2, capacity=10_000)
    allocs = set()
    for i in range(50):
        ltm.add(torch.full((1, 8, 2), float(i)), torch.zeros(1, 8, 2), torch.full((1, 8), i))
        allocs.add(ltm.rows.shape[1])
    assert len(ltm) == 400 and len(allocs) == 1
    assert torch.equal(ltm.view(0)[0][::8, 0], torch.arange(50.0))


def test_uninitialized_pool_is_filled_by_tiling_the_first_block():
    mem = pool()
    mem.initialized = False
    delta = torch.randn(L, K, D)
    evicted, _ = mem.commit(delta)
    assert evicted.shape[1] == 0 and mem.initialized
    ordered = mem.ordered_rows()
    for b in range(N // K):
        assert torch.equal(ordered[:, b * K:(b + 1) * K], delta)


def test_save_load_round_trip(tmp_path):
    mem = pool(ltm_capacity=10)
    mem.commit(torch.randn(L, K, D), keys_fn=fake_keys)
    mem.save(tmp_path / "m")
    back = MemoryState.load(tmp_path / "m")
    for a, b in zip(mem.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert back.ltm.capacity == 10 and back.num_tokens == K


def test_clone_is_independent():
    mem = pool(ltm_capacity=10)
    copy = mem.clone()
    mem.commit(torch.randn(L, K, D), keys_fn=fake_keys)
    assert len(copy.ltm) == 0 and not torch.equal(copy.rows, mem.rows)


def test_corrupt_snapshot_is_rejected(tmp_path):
    mem = pool()
    mem.ranks[0, 0] = mem.ranks[0, 1]
    mem.save(tmp_path / "m")
    with pytest.raises(ValueError, match="not a permutation"):
        MemoryState.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no memory snapshot"):
        MemoryState.load(tmp_path / "nowhere")


def test_delta_with_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"delta has shape \(3, 2, 4\)"):
        pool().commit(torch.zeros(L, 2, D))


def filled_ltm_pool():
    mem = pool(ltm_capacity=100)
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        mem.commit(torch.full((L, K, D), -1.0 - i), keys_fn=fake_keys, generator=g)
    assert mem.ltm.size == 4 * K
    return mem


def test_with_empty_ltm_shares_the_pool_and_carries_an_empty_long_term_memory_of_the_same_shape():
    mem = filled_ltm_pool()
    view = mem.with_empty_ltm()
    assert view.rows is mem.rows and view.ranks is mem.ranks and view.ages is mem.ages
    assert view.ltm.size == 0 and mem.ltm.size == 4 * K
    assert (view.ltm.num_layers, view.ltm.hidden_size, view.ltm.key_size, view.ltm.capacity) == (L, D, S, 100)
    assert pool().with_empty_ltm().ltm is None


def test_ltm_clear_forgets_every_row_and_takes_new_ones():
    mem = filled_ltm_pool()
    mem.ltm.clear()
    assert len(mem.ltm) == 0 and mem.ltm.view(0)[0].shape == (0, D)
    mem.commit(torch.zeros(L, K, D), keys_fn=fake_keys, generator=torch.Generator().manual_seed(1))
    assert mem.ltm.size == K and (mem.ltm.ages[:, :K] >= K).all()


def test_ltm_retrieve_takes_the_best_scoring_rows_oldest_first():
    mem = filled_ltm_pool()
    keys = mem.ltm.view(1)[1]
    queries = keys[[2, 7]].mean(0, keepdim=True)[None]               # [1, 1, S]: close to rows 2 and 7
    idx = mem.ltm.retrieve(1, queries, 4)
    scores = mem.ltm.scores(1, queries)
    assert idx.shape == (1, 4) and set(idx[0].tolist()) == set(scores[0].topk(4).indices.tolist())
    ages = mem.ltm.view(1)[2][idx[0]]
    assert bool((ages[:-1] >= ages[1:]).all()), "oldest first"
    assert mem.ltm.retrieve(1, queries, 100).shape == (1, 4 * K)     # fewer rows than asked: all of them
