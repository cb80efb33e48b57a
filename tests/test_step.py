"""The training step in plain torch (stages/step.py), driven with scripted decisions and no Lightning Trainer."""
import random
import subprocess
import sys

import pytest
import torch

from mplus_lightning import MPlus, tiny_config
from mplus_lightning.config import StepConfig
from mplus_lightning.data.sample import Sample
from mplus_lightning.stages.step import (
    NOT_POSITIVE,
    Decisions,
    MemoryStep,
    ScriptedDecisions,
    retrieval_labels,
    rows_written_at,
    target_sequence,
)

from .conftest import randomize_adapters

N, K, L = 32, 8, 3   # tiny_config: 6 blocks of K=8, 2 of them read from the long-term memory; 3 layers


def stage3_step(decisions=None, **step_overrides) -> MemoryStep:
    """A stage-3 step (long-term memory, retriever and encoder-retriever losses) on a tiny model whose memory has
    been written a few times (initialised pool, a non-empty long-term memory)."""
    torch.manual_seed(0)
    model = randomize_adapters(MPlus(tiny_config()))
    memory = model.new_memory()
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        model.inject(memory, torch.randint(3, 512, (1, 12), generator=g), generator=g)
    cfg = StepConfig(**{"retriever_loss": True, "num_contexts_schedule": [[0, 8]], **step_overrides})
    return MemoryStep(model, cfg, memory, decisions=decisions, instruction_ids=[5, 6])


def sample(n_contexts=3, seed=0, **fields) -> Sample:
    g = torch.Generator().manual_seed(seed)
    return Sample([torch.randint(3, 512, (12,), generator=g) for _ in range(n_contexts)],
                  torch.randint(3, 512, (20,), generator=g), doc_id=str(seed), **fields)


def layer_ranks(*per_layer) -> torch.Tensor:
    return torch.tensor(per_layer)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def has(grad_names, *parts) -> bool:
    return any(all(p in n for p in parts) for n in grad_names)


def test_the_step_module_imports_no_lightning():
    code = ("import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None; "
            "import mplus_lightning.stages.step; "
            "assert not [m for m in sys.modules if m.startswith(('lightning.', 'pytorch_lightning.'))]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_scripted_multi_chunk_stage3_step_evicts_the_scripted_rows_and_trains_the_read_side():
    # Three commits; each scripted eviction names rows that were in the pool before the step (ranks below the new
    # blocks), so which rows must reach the long-term memory is known from the pool before the step.
    evictions = [layer_ranks([0, 3, 5, 9, 12, 20, 30, 31], [1, 2, 3, 4, 5, 6, 7, 8], [24, 25, 26, 27, 28, 29, 30, 31]),
                 layer_ranks([0, 1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 23], [0, 2, 4, 6, 8, 10, 12, 14]),
                 torch.tensor([8, 9, 10, 11, 12, 13, 14, 15])]        # [K]: the same ranks in every layer
    script = ScriptedDecisions(full_context=[False], multi_chunk=[True], num_chunks=[3], evictions=evictions,
                               query_lengths=[[3, 7, 19]])
    step = stage3_step(script)
    memory = step.memory
    ordered = memory.ordered_rows()
    pools = [list(ordered[l].unbind(0)) for l in range(L)]   # per layer, the rows in rank order
    ltm_before = len(memory.ltm)
    expected = []
    for ranks in evictions:
        ranks = ranks.expand(L, K).tolist()
        expected.append(torch.stack([torch.stack([pools[l][r] for r in ranks[l]]) for l in range(L)]))
        # survivors keep their order; the new block (whose rows are not checked here) goes on top
        pools = [[row for r, row in enumerate(pools[l]) if r not in ranks[l]] + [None] * K for l in range(L)]

    result = step.step(sample(n_contexts=3))

    assert result.kind == "multi" and result.metrics["num_contexts"] == 3
    assert len(memory.ltm) == ltm_before + 3 * K
    ltm_rows = memory.ltm.rows[:, ltm_before:ltm_before + 3 * K]
    for i, want in enumerate(expected):
        torch.testing.assert_close(ltm_rows[:, i * K:(i + 1) * K], want, rtol=0, atol=0, msg=f"commit {i}")
    # the official labels: every row this sample wrote, i.e. the 3 newest blocks
    newest = memory.slots_in_rank_order()[:, -3 * K:]
    assert result.positives.sum(dim=1).tolist() == [3 * K] * L
    assert torch.equal(result.positives.gather(1, newest), torch.ones(L, 3 * K, dtype=torch.bool))
    assert {"retriever_loss", "retriever_encoder_loss"} <= set(result.metrics)

    assert torch.isfinite(result.loss)
    result.loss.backward()
    touched = grads(step.model)
    assert has(touched, "lora_B.read") and not has(touched, "lora_B.write"), "injection runs without gradient"
    for part in ("retriever.query_proj", "retriever.key_proj", "retriever.encoder_query_proj", "memory_bos"):
        assert has(touched, part), part
    assert "new_memory_embedding" not in touched, "only the write pass adds e"
    script.assert_consumed()


def test_a_scripted_single_chunk_step_reads_the_new_block_with_the_write_adapter():
    script = ScriptedDecisions(full_context=[False], multi_chunk=[False], evictions=[torch.arange(K)])
    step = stage3_step(script)
    oldest = step.memory.ordered_rows()[:, :K].clone()
    ltm_before = len(step.memory.ltm)
    result = step.step(sample(n_contexts=3))
    assert result.kind == "single" and result.positives is None
    torch.testing.assert_close(step.memory.ltm.rows[:, ltm_before:ltm_before + K], oldest, rtol=0, atol=0)
    result.loss.backward()
    touched = grads(step.model)
    assert has(touched, "lora_B.write") and not has(touched, "lora_B.read") and not has(touched, "retriever")
    assert "new_memory_embedding" in touched
    script.assert_consumed()   # a single-chunk step asks for no chunk count and no query lengths


def test_a_scripted_revisit_rereads_the_cached_target_against_the_moved_memory():
    keep_new_rows = torch.arange(K)                      # evict the oldest ranks: the newest blocks stay
    script = ScriptedDecisions(full_context=[False] * 4, multi_chunk=[False, False, True, False], revisit=[True],
                               replace_cache=[False], evictions=[keep_new_rows] * 3, query_lengths=[[5, 5, 5]])
    step = stage3_step(script)
    first = step.step(sample(seed=1))                    # fills the cache with its target (document 0)
    step.step(sample(seed=2))                            # a revisit needs chunks written since
    stamped_by_first = step.row_stamps == 0
    before = step.memory.clone()
    revisit = step.step(sample(seed=3))
    assert revisit.kind == "revisit" and revisit.metrics["revisit_distance_chunks"] == 1
    assert torch.equal(revisit.positives, stamped_by_first) and stamped_by_first.sum(dim=1).tolist() == [K] * L
    assert torch.equal(step.memory.rows, before.rows) and len(step.memory.ltm) == len(before.ltm), "no write"
    torch.testing.assert_close(revisit.lm_loss, step.model.lm_loss(step.revisit.ids, step.revisit.mask,
                                                                   step.model.view(step.memory))[0])
    assert first.kind == "single" and "retriever_loss" in revisit.metrics
    step.step(sample(seed=4))                            # after a revisit: asks replace_cache, keeps the cache
    assert step.revisit.doc == 0 and step.revisit.chunks_since == 2
    script.assert_consumed()


def test_scripted_decisions_name_what_is_missing_or_left_over():
    step = stage3_step(ScriptedDecisions(full_context=[False]))
    with pytest.raises(LookupError, match=r"multi_chunk\(\)"):
        step.step(sample())
    left = ScriptedDecisions(revisit=[True], evictions=[torch.arange(K)])
    with pytest.raises(AssertionError, match="revisit.*evictions|evictions.*revisit"):
        left.assert_consumed()
    with pytest.raises(TypeError, match="num_chunk"):
        ScriptedDecisions(num_chunk=[1])
    with pytest.raises(ValueError, match="evictions must be"):
        stage3_step(ScriptedDecisions(full_context=[False], multi_chunk=[False], evictions=[[0, 1]])).step(sample())


def test_long_term_rows_are_retrieved_with_the_scripted_prefix_of_the_target():
    # A full-context step on two tokens scores the second from the first. Retrieving with the first token alone
    # (scripted, like the official training's random prefix) retrieves what a read of that one token retrieves.
    two = Sample([torch.tensor([7])], torch.tensor([9]), doc_id="two")
    script = ScriptedDecisions(full_context=[True], ltm_query_lengths=[[1, 1, 1]])
    step = stage3_step(script)
    prefix = step.step(two).loss
    script.assert_consumed()
    one_token = step.model.read(step.memory, torch.tensor([[7]]))[0, 0]
    torch.testing.assert_close(prefix, torch.nn.functional.cross_entropy(one_token, torch.tensor(9)))
    whole = stage3_step(ScriptedDecisions(full_context=[True])).step(two).loss   # unscripted: the whole target
    assert abs(whole.item() - prefix.item()) > 1e-4
    # default: the official random prefix per layer, from the per-rank stream
    expected = random.Random("3:1")
    drawn = Decisions(StepConfig(), seed=3, rank=1).ltm_query_lengths(10, L)
    assert drawn == [expected.randint(1, 9) for _ in range(L)]
    # a sample that names its question tokens retrieves with them (no draw)
    asked = Sample([torch.tensor([7, 8])], torch.tensor([9, 5, 6]), doc_id="asked", retrieval_query_tokens=1)
    step = stage3_step(ScriptedDecisions(full_context=[False], multi_chunk=[True], num_chunks=[1],
                                         evictions=[torch.arange(K)], query_lengths=[]))
    view = step._view(step.memory, 3, asked.retrieval_query_tokens)
    assert view.ltm_query_lengths == [1] * L
    with pytest.raises(ValueError, match="ltm_query_lengths needs one length"):
        ScriptedDecisions(ltm_query_lengths=[[1, 2]]).ltm_query_lengths(10, L)


def test_default_decisions_draw_from_the_documented_streams():
    cfg = StepConfig(full_context_ratio=0.3)
    d = Decisions(cfg, seed=7, rank=1)
    steps, rank = random.Random("7:steps"), random.Random("7:1")
    assert [d.full_context() for _ in range(20)] == [steps.random() < 0.3 for _ in range(20)]
    # 200 draws: a few can agree by chance with another range (randint reads the same bits for 1..9 and 1..10)
    assert d.query_lengths(10, 200) == [rank.randint(1, 9) for _ in range(200)]
    assert d.ltm_query_lengths(10, 200) == [rank.randint(1, 9) for _ in range(200)]
    assert d.query_lengths(2, 50) == d.ltm_query_lengths(2, 50) == [1] * 50   # never the whole target
    memory = MPlus(tiny_config()).new_memory()
    assert torch.equal(d.evictions(memory), memory.sample_evictions(torch.Generator().manual_seed(7001)))
    assert d.num_chunks(available=3, scheduled=8) == 3 and d.num_chunks(available=9, scheduled=8) == 8


def test_default_decisions_ask_one_stream_in_the_steps_order_with_the_documented_comparisons():
    cfg = StepConfig(full_context_ratio=0.3, multi_chunk_ratio=0.6, pass_ratio=0.3, empty_prob=0.5)
    d, steps = Decisions(cfg, seed=5, rank=0), random.Random("5:steps")
    for _ in range(50):
        assert d.full_context() == (steps.random() < 0.3)
        assert d.multi_chunk() == (steps.random() < 0.6)
        assert d.revisit() == (steps.random() >= 0.3)      # pass_ratio is the probability of *not* revisiting
        assert d.replace_cache() == (steps.random() < 0.5)


def written_chunks(step: MemoryStep) -> list[list[torch.Tensor]]:
    """Record the chunks each no-gradient injection of `step` writes (a multi-chunk step of several chunks)."""
    seen, inject = [], step._inject_no_grad

    def recording(memory, stamps, chunks, *args, **kwargs):
        seen.append([c.clone() for c in chunks])
        return inject(memory, stamps, chunks, *args, **kwargs)
    step._inject_no_grad = recording
    return seen


@pytest.mark.parametrize("repeat", [False, True])
def test_a_multi_chunk_step_of_fewer_chunks_than_the_document_injects_its_last_ones_or_a_repeats_first(repeat):
    # The document has 3 chunks, the step injects 2: a normal sample reads its target after its last 2 chunks (the
    # text right before it); a repeat sample copies the text it injected, which starts at the document's start.
    script = ScriptedDecisions(full_context=[False], multi_chunk=[True], num_chunks=[2],
                               evictions=[torch.arange(K), torch.arange(K)], query_lengths=[[1, 2, 3]])
    step = stage3_step(script, max_seq_length=64)
    seen = written_chunks(step)
    s = sample(n_contexts=3, repeat=repeat)
    targets = []
    target = step.target
    step.target = lambda smp, chunks: targets.append(target(smp, chunks)) or targets[-1]
    result = step.step(s)
    want = s.contexts[:2] if repeat else s.contexts[1:]
    assert result.kind == "multi" and result.metrics["num_contexts"] == 2
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], want, strict=True))
    ids = targets[0][0].reshape(-1)
    if repeat:   # instruction [5, 6], then the injected text in order
        assert ids.tolist() == [5, 6] + torch.cat(want).tolist()
    else:
        assert torch.equal(ids, s.target)
    script.assert_consumed()


def test_a_repeat_target_masks_the_instruction_and_the_extra_tokens_and_is_cut_at_max_seq_length():
    chunks = [torch.arange(10, 22), torch.arange(30, 42)]     # 24 tokens of injected text
    s = Sample(chunks, torch.arange(3, 8), repeat=True)
    ids, mask = target_sequence(s, chunks, instruction_ids=[5, 6], max_seq_length=64, mask_extra_tokens=5)
    assert ids.tolist() == [5, 6] + list(range(10, 22)) + list(range(30, 42))
    assert mask.tolist() == [False] * 7 + [True] * 19         # the instruction and 5 more positions are not scored
    ids, mask = target_sequence(s, chunks, instruction_ids=[5, 6], max_seq_length=16, mask_extra_tokens=5)
    assert ids.tolist() == [5, 6] + list(range(10, 22)) + [30, 31]
    assert mask.tolist() == [False] * 7 + [True] * 9
    plain = Sample(chunks, torch.arange(3, 8), target_mask=torch.tensor([0, 0, 1, 1, 1]))
    ids, mask = target_sequence(plain, chunks, instruction_ids=[5, 6], max_seq_length=4, mask_extra_tokens=5)
    assert ids.tolist() == [3, 4, 5, 6] and mask.tolist() == [False, False, True, True]


def test_the_state_round_trip_continues_exactly():
    cfg = dict(full_context_ratio=0.2, multi_chunk_ratio=0.6, pass_ratio=0.3, empty_prob=0.5)
    a = stage3_step(**cfg)
    a.decisions = Decisions(a.cfg, seed=3, rank=1)
    with torch.no_grad():
        for seed in range(3):
            a.step(sample(seed=seed))
        state = a.state_dict()
        losses = [a.step(sample(seed=seed)).loss for seed in range(3, 9)]
    b = MemoryStep(a.model, a.cfg, decisions=Decisions(a.cfg, seed=0, rank=0))
    b.load_state_dict(state)
    with torch.no_grad():
        again = [b.step(sample(seed=seed)).loss for seed in range(3, 9)]
    assert torch.equal(torch.stack(again), torch.stack(losses))
    assert torch.equal(b.memory.rows, a.memory.rows) and torch.equal(b.row_stamps, a.row_stamps)
    assert b.docs_seen == a.docs_seen == 9 and b.recent_docs == a.recent_docs


def test_validation_scores_a_copy_of_the_memory():
    step = stage3_step()
    before = step.memory.clone()
    loss, accuracy = step.validate(sample())
    assert torch.isfinite(loss) and 0 <= accuracy <= 1
    assert torch.equal(step.memory.rows, before.rows) and len(step.memory.ltm) == len(before.ltm)


def test_a_samples_positives_mark_the_rows_its_marked_tokens_write():
    # Chunk 1 of 3 marks its tokens 5 and 10: chunk tokens 4..11 write rows 0..7, so rows 1 and 6 are the positives;
    # the retriever's queries are the first 4 target tokens (no query lengths are drawn).
    positives = [torch.zeros(12, dtype=torch.bool) for _ in range(3)]
    positives[1][[5, 10]] = True
    s = sample(retrieval_positives=positives, retrieval_query_tokens=4)
    script = ScriptedDecisions(full_context=[False], multi_chunk=[True], num_chunks=[3],
                               evictions=[torch.arange(K)] * 3)
    step = stage3_step(script)
    result = step.step(s)
    slots = step.memory.slots_in_rank_order()
    chunk1 = slots[:, N - 2 * K:N - K]                   # the middle one of the three new blocks, row order
    want = torch.zeros(L, N, dtype=torch.bool)
    want.scatter_(1, chunk1[:, [1, 6]], True)
    assert torch.equal(result.positives, want)
    assert torch.equal(step.row_stamps == 0, want)
    assert (step.row_stamps.gather(1, slots[:, N - 3 * K:]) == NOT_POSITIVE).sum(dim=1).tolist() == [3 * K - 2] * L
    script.assert_consumed()
    # the marked chunk not injected (only the last one is): the official labels, random query lengths
    script = ScriptedDecisions(full_context=[False], multi_chunk=[True], num_chunks=[1], evictions=[torch.arange(K)],
                               query_lengths=[[2, 2, 2]])
    step = stage3_step(script)
    result = step.step(s)
    assert result.positives.sum(dim=1).tolist() == [K] * L
    script.assert_consumed()


def test_row_stamps_follow_each_new_row_through_a_random_eviction():
    # A single-chunk step on a K-token chunk marking tokens 2 and 5 (rows 2 and 5), with the default seeded
    # evictions: the slots that now hold those rows of the write are stamped with the step's document, the rest of
    # the new block as not positive.
    step = stage3_step(full_context_ratio=0.0, multi_chunk_ratio=0.0)
    marked = torch.zeros(K, dtype=torch.bool)
    marked[[2, 5]] = True
    s = Sample([torch.randint(3, 512, (K,))], torch.randint(3, 512, (12,)), retrieval_positives=[marked])
    delta = step.model.write(step.memory, s.contexts[0][None])
    result = step.step(s)
    slots = step.memory.slots_in_rank_order()[:, N - K:]          # the new block, in delta's row order
    assert result.kind == "single"
    for l in range(L):
        torch.testing.assert_close(step.memory.rows[l, slots[l]], delta[l])
        assert step.row_stamps[l, slots[l]].tolist() == [NOT_POSITIVE] * 2 + [0] + [NOT_POSITIVE] * 2 + [0] + [
            NOT_POSITIVE] * 2
    assert (step.row_stamps == 0).sum().item() == 2 * L


def test_rows_written_at_follow_the_write_layout():
    # Row r of a K-row write is the output at chunk token n - K + r: a chunk longer than K writes its last K tokens'
    # rows, a shorter one re-processes old rows first (never marked).
    def rows(n, marked, k=4):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[marked] = True
        return rows_written_at(mask, k).tolist()

    assert rows(4, [2]) == [False, False, True, False]
    assert rows(6, [3, 4]) == [False, True, True, False]           # tokens 2..5 write rows 0..3
    assert rows(3, [0]) == [False, True, False, False]             # one re-processed old row, then tokens 0..2
    assert rows(6, [0]) == [False] * 4                             # token 0 writes no row


def test_retrieval_labels_fall_back_to_the_official_rule():
    s = sample(n_contexts=2)
    official = retrieval_labels(s, [0, 1], K)
    assert official.query_tokens is None and all(r.all() for r in official.rows)
    marked = [torch.zeros(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)]
    marked[1][0] = True                                            # token 0 of a 12-token chunk writes no row
    labels = retrieval_labels(sample(n_contexts=2, retrieval_positives=marked, retrieval_query_tokens=3), [0, 1], K)
    assert labels.query_tokens == 3 and not labels.rows[0].any() and labels.rows[1].all()
    with pytest.raises(ValueError, match="retrieval_positives"):
        retrieval_labels(sample(n_contexts=2, retrieval_positives=marked[:1]), [0, 1], K)


def test_sharded_entry_points_gather_like_a_forward_and_keep_the_probes_scores(tmp_path):
    # FSDP2 on one gloo rank with bf16 compute: the typed entry points are registered as forwards (a root parameter
    # used outside one is a sharded DTensor and fails), and the retriever probe survives FSDP2's input casting.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mplus_lightning.distributed import shard_backbone
    from mplus_lightning.model.mplus import RetrieverProbe

    torch.manual_seed(0)
    model = MPlus(tiny_config())
    memory = model.new_memory()
    model.inject(memory, torch.randint(3, 512, (1, 12)))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        shard_backbone(model, init_device_mesh("cpu", (1,)), param_dtype=torch.bfloat16)
        ids = torch.randint(3, 512, (1, 10))
        delta = model.write_pass(ids, memory.newest_block())
        probe = RetrieverProbe([4, 4, 4])
        loss, count = model.lm_loss(ids, torch.ones_like(ids, dtype=torch.bool), model.view(memory), probe=probe)
        keys = model.ltm_keys(delta.detach())
        plain, _, _ = model.plain_lm_loss(ids, torch.ones_like(ids, dtype=torch.bool))
        (loss + torch.stack(probe.scores).sum() + plain).backward()
    finally:
        dist.destroy_process_group()
    assert delta.shape == (L, K, 64) and keys.shape == (L, K, 16) and count == 9
    assert len(probe.scores) == L and torch.isfinite(loss)
    assert model.layers[0].retriever.key_proj[0].weight.grad is not None
    with pytest.raises(TypeError, match="write_pass"):
        model(ids)
