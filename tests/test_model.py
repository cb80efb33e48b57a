"""Behaviour of MPlus on tiny random configs: backbone = HF Llama, read/write semantics, retrieval, KV cache."""
import pytest
import torch
from transformers import LlamaForCausalLM

from mplus_lightning import MemoryState, MPlus, tiny_config
from mplus_lightning.model.mplus import MemoryKVCache, ReadView
from mplus_lightning.model.retriever import mean_sigmoid_scores, retriever_bce_loss, select_oldest_first

from .conftest import filled, random_ids, randomize_adapters


def test_backbone_without_memory_equals_hf_llama(tiny_model):
    hf = LlamaForCausalLM(tiny_model.llama.config).eval()
    base = {k.replace("llama.", "").replace(".base_layer", ""): v for k, v in tiny_model.state_dict().items()
            if k.startswith("llama.") and "lora_" not in k and "memory_bos" not in k and "retriever" not in k}
    hf.load_state_dict(base, strict=True)
    ids = random_ids(13, batch=2)
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(tiny_model.backbone_logits(ids), expected, rtol=1e-5, atol=1e-5)
    # an active adapter (random, non-zero) changes the result: the comparison above really ran without LoRA
    assert not torch.allclose(tiny_model.backbone_logits(ids, adapter="read"), expected, atol=1e-4)


def test_inject_commits_the_written_delta_as_newest_block(tiny_model):
    mem = filled(tiny_model, chunks=1)
    ids = random_ids(24, seed=7)
    delta = tiny_model.write(mem, ids)
    before_ltm = len(mem.ltm)
    tiny_model.inject(mem, ids)
    torch.testing.assert_close(mem.newest_block(), delta)
    assert len(mem.ltm) == before_ltm + tiny_model.config.num_tokens


def test_first_inject_fills_a_fresh_pool_and_moves_nothing_to_ltm(tiny_model):
    mem = tiny_model.new_memory()
    assert not mem.initialized
    tiny_model.inject(mem, random_ids(20))
    assert mem.initialized and len(mem.ltm) == 0


def test_ltm_keys_are_the_retrievers_keys_of_the_evicted_rows(tiny_model):
    mem = filled(tiny_model, chunks=1)
    before = mem.clone()
    evict = before.sample_evictions(torch.Generator().manual_seed(5))
    tiny_model.inject(mem, random_ids(20), generator=torch.Generator().manual_seed(5))
    evicted = torch.gather(before.ordered_rows(), 1, evict[..., None].expand(-1, -1, mem.hidden_size))
    rows, keys, _ = mem.ltm.view(1)
    torch.testing.assert_close(rows, evicted[1])
    layer = tiny_model.layers[1]
    torch.testing.assert_close(keys, layer.retriever.key_proj(layer.input_layernorm(evicted[1])))


def test_retrieval_returns_min_k0_rows_oldest_first(tiny_model):
    K0 = tiny_model.config.ltm_read_rows
    mem = filled(tiny_model, chunks=2)            # 1 block of K=8 rows in LTM (< K0 = 16)
    _, few = tiny_model.read(mem, random_ids(10), return_retrieved=True)
    assert few.shape[-1] == len(mem.ltm) == 8
    mem = filled(tiny_model, chunks=6)            # 5 blocks = 40 rows (> K0)
    _, idx = tiny_model.read(mem, random_ids(10, batch=2), return_retrieved=True)
    assert idx.shape == (3, 2, K0)
    for l in range(3):
        ages = mem.ltm.view(l)[2]
        for b in range(2):
            picked = ages[idx[l, b]]
            assert bool((picked[:-1] >= picked[1:]).all()), "oldest first"
            assert len(set(idx[l, b].tolist())) == K0, "no duplicates"


def test_selection_is_the_top_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3]])
    ages = torch.tensor([10, 20, 30, 40, 50])
    assert select_oldest_first(scores, ages, 3).tolist() == [[3, 2, 1]]
    assert select_oldest_first(scores, ages, 9).tolist() == [[4, 3, 2, 1, 0]]


def test_blocked_scoring_equals_dense_scoring():
    q, k = torch.randn(2, 5, 4), torch.randn(37, 4)
    dense = torch.sigmoid(q @ k.t()).mean(1)
    torch.testing.assert_close(mean_sigmoid_scores(q, k, block_rows=8), dense)


def test_retriever_bce_loss_is_class_balanced():
    w = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3])
    y = torch.tensor([1, 1, 0, 0, 0])
    pos = -torch.log(w[:2] + 1e-5).mean()
    neg = -torch.log(1 - w[2:] + 1e-5).mean()
    torch.testing.assert_close(retriever_bce_loss(w, y), (pos + neg) / 2)
    torch.testing.assert_close(retriever_bce_loss(w, y, negative_weight=3.0), (pos + 3 * neg) / 4)
    assert torch.isfinite(retriever_bce_loss(w, torch.zeros(5))), "no positives: no NaN"


@pytest.mark.parametrize("ltm_blocks", [2, 0])
def test_incremental_generation_equals_recomputing_the_read_pass(ltm_blocks):
    torch.manual_seed(0)
    model = randomize_adapters(MPlus(tiny_config(num_ltm_blocks=ltm_blocks, num_blocks=4 + ltm_blocks)).eval())
    # the LTM holds exactly K0 rows, so a longer read retrieves the same rows (fewer than K0: the tests below)
    mem = filled(model, chunks=3)
    prompt = random_ids(9, batch=2, seed=3)
    out = model.generate(mem, prompt, max_new_tokens=6, eos_token_id=None)
    full = model.read(mem, out[:, :-1])
    assert torch.equal(full[:, prompt.shape[1] - 1:].argmax(-1), out[:, prompt.shape[1]:])


def test_generate_stops_at_eos_and_pads_finished_rows(tiny_model):
    mem = filled(tiny_model, chunks=2)
    prompt = random_ids(9, batch=1, seed=3)
    first = tiny_model.generate(mem, prompt, max_new_tokens=1, eos_token_id=None)[0, -1].item()
    out = tiny_model.generate(mem, prompt, max_new_tokens=5, eos_token_id=first)
    assert out.shape[1] == prompt.shape[1] + 1 and out[0, -1].item() == first


def test_sampling_is_reproducible_with_a_generator(tiny_model):
    mem = filled(tiny_model, chunks=2)
    prompt = random_ids(9, seed=3)
    a = tiny_model.generate(mem, prompt, 5, do_sample=True, top_k=20, generator=torch.Generator().manual_seed(1),
                            eos_token_id=None)
    b = tiny_model.generate(mem, prompt, 5, do_sample=True, top_k=20, generator=torch.Generator().manual_seed(1),
                            eos_token_id=None)
    assert torch.equal(a, b)


def test_batched_read_equals_one_by_one(tiny_model):
    mem = filled(tiny_model, chunks=6)
    ids = random_ids(11, batch=3, seed=4)
    together = tiny_model.read(mem, ids)
    for b in range(3):
        torch.testing.assert_close(together[b:b + 1], tiny_model.read(mem, ids[b:b + 1]), rtol=1e-5, atol=1e-5)


def test_slot_layout_does_not_change_results(tiny_model):
    """Only ranks matter: permuting the slots of the pool (ranks moved along) gives the same logits."""
    mem = filled(tiny_model, chunks=6)
    ids = random_ids(17, seed=4)
    perm = torch.randperm(mem.size)
    shuffled = MemoryState(rows=mem.rows[:, perm].clone(), ranks=mem.ranks[:, perm].clone(),
                           ages=mem.ages[:, perm].clone(), num_tokens=mem.num_tokens, ltm=mem.ltm)
    torch.testing.assert_close(tiny_model.read(shuffled, ids), tiny_model.read(mem, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny_model.write(shuffled, ids), tiny_model.write(mem, ids), rtol=1e-5, atol=1e-5)


def test_the_two_adapters_give_different_memory_views(tiny_model):
    """The same rows under the write and read adapters yield different K/V."""
    layer = tiny_model.layers[0]
    rows = torch.randn(1, 4, 64)
    pos = torch.arange(4)[None]
    from mplus_lightning.model.adapters import activate
    activate(layer.lora(), "write")
    k_write, _ = layer.memory_kv(rows, pos, tiny_model.rotary)
    activate(layer.lora(), "read")
    k_read, _ = layer.memory_kv(rows, pos, tiny_model.rotary)
    assert not torch.allclose(k_write, k_read)


def test_trainable_parameters_are_the_official_set(tiny_model):
    tiny_model.freeze_backbone()
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert "new_memory_embedding" in trainable
    assert any("lora_A.write" in n for n in trainable) and any("lora_B.read" in n for n in trainable)
    assert any("retriever.query_proj" in n for n in trainable)
    assert not any("base_layer" in n or "embed_tokens" in n or "lm_head" in n for n in trainable)


def test_short_term_kv_is_reused_between_reads_and_recomputed_after_any_change(tiny_model, monkeypatch):
    mem = filled(tiny_model, chunks=6)
    ids = random_ids(10, seed=5)
    first = tiny_model.read(mem, ids)
    rows_projected = []
    real = type(tiny_model.layers[0]).memory_kv

    def counting(layer, rows, positions, rotary):
        rows_projected.append(rows.shape[1])
        return real(layer, rows, positions, rotary)

    monkeypatch.setattr(type(tiny_model.layers[0]), "memory_kv", counting)
    torch.testing.assert_close(tiny_model.read(mem, ids), first)
    assert max(rows_projected) == 1 + tiny_model.config.ltm_read_rows, "only BOS + retrieved rows were projected"
    # a commit, a hand edit of the pool, and a weight update each invalidate the stored K/V
    tiny_model.inject(mem, random_ids(20, seed=6))
    torch.testing.assert_close(tiny_model.read(mem, ids), tiny_model.read(mem.clone(), ids))
    mem.rows[0, 0] += 1.0
    torch.testing.assert_close(tiny_model.read(mem, ids), tiny_model.read(mem.clone(), ids))
    with torch.no_grad():
        tiny_model.layers[1].self_attn.k_proj.lora_B["read"].weight.add_(0.5)
    torch.testing.assert_close(tiny_model.read(mem, ids), tiny_model.read(mem.clone(), ids))
    assert mem.clone().kv_store == {}, "a clone starts without stored K/V"


def test_a_read_of_rows_just_written_equals_the_read_of_one_tensor_with_them_and_back_propagates_alike(tiny_model):
    """A one-chunk training step reads the pool with the new block carrying its gradient (`ReadView.written`): the
    block is projected with BOS and the other rows apart, without an input gradient. Loss and every gradient equal
    the read of one pool tensor with the block scattered in (all rows then carry a gradient), to fp32 rounding."""
    model = tiny_model   # eval mode: no LoRA dropout, gradients still flow
    memory = filled(model, chunks=3)
    ids, chunk = random_ids(12, seed=7), random_ids(20, seed=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    previous = memory.newest_block()
    with torch.no_grad():
        model.inject(memory, chunk)
    slots = memory.slots_in_rank_order()[:, -memory.num_tokens:]
    results = []
    for written in (True, False):
        delta = model.write_pass(chunk, previous)
        torch.testing.assert_close(memory.rows.gather(1, slots[..., None].expand_as(delta)), delta.detach())
        view = model.view(memory)
        if written:
            view.written = (slots, delta)
        else:
            rows = memory.rows.detach().clone()
            view.rows = rows.scatter(1, slots[..., None].expand(-1, -1, rows.shape[2]), delta)
        loss, _ = model.lm_loss(ids, torch.ones_like(ids, dtype=torch.bool), view)
        results.append((loss.detach(), torch.autograd.grad(loss, trainable, allow_unused=True)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert sum(g is not None for g in grads_a) > 10, "the write pass and the read both received gradients"
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_a_training_read_projects_its_gradient_free_rows_apart_from_bos(tiny_model, monkeypatch):
    """BOS is a parameter: projected together with the pool, autograd would back-propagate into every pool row. In a
    training read the pool and the retrieved rows are projected apart (without an input gradient); a write pass's
    few previous rows project with BOS in one call, and so do the retrieved rows of an inference read."""
    memory = filled(tiny_model, chunks=6)
    calls = []
    real = type(tiny_model.layers[0]).memory_kv

    def recording(layer, rows, positions, rotary):
        calls.append((rows.shape[1], rows.requires_grad))
        return real(layer, rows, positions, rotary)

    monkeypatch.setattr(type(tiny_model.layers[0]), "memory_kv", recording)
    ids = random_ids(10, seed=5)
    L, K0, N, K = (len(tiny_model.layers), tiny_model.config.ltm_read_rows, memory.size, memory.num_tokens)
    tiny_model.lm_loss(ids, torch.ones_like(ids, dtype=torch.bool), tiny_model.view(memory))
    assert sorted(calls) == sorted([(1, True), (K0 + N, False)] * L)
    calls.clear()
    tiny_model.write_pass(random_ids(20, seed=6), memory.newest_block())
    assert calls == [(1 + K, True)] * L
    calls.clear()
    with torch.no_grad():   # inference: the pool's K/V into the memory's store, BOS with the retrieved rows
        tiny_model.read(memory.clone(), ids)
    assert sorted(calls) == sorted([(N, False), (1 + K0, False)] * L)


def test_the_lm_loss_is_taken_on_float32_logits_when_the_model_runs_in_bfloat16():
    # bf16-true precision (no autocast): the lm_head's output is bf16, but the cross-entropy runs on float32 logits,
    # as in the official training; a bf16 log-softmax over the vocabulary would round the loss to 3 digits.
    torch.manual_seed(0)
    model = randomize_adapters(MPlus(tiny_config())).to(torch.bfloat16)
    memory = filled(model, 3)
    ids = random_ids(20)
    mask = torch.ones_like(ids, dtype=torch.bool)
    loss, count = model.lm_loss(ids, mask, model.view(memory))
    assert loss.dtype == torch.float32 and int(count) == 19 and torch.isfinite(loss)
    with torch.no_grad():
        logits = model.read(memory, ids)[0, :-1]
    assert logits.dtype == torch.bfloat16
    want = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
    torch.testing.assert_close(loss.detach(), want, rtol=0.02, atol=0.02)


def test_fewer_than_k0_retrieved_rows_sit_right_before_the_short_term_rows(tiny_model):
    # m < K0 stored long-term rows: they take positions 1+K0-m .. K0 (oldest first), so that the short-term rows and
    # the prompt keep theirs; equal to an explicit view of those rows at those positions.
    model = tiny_model
    memory = filled(model, chunks=2)
    K0, N, m = model.config.ltm_read_rows, memory.size, memory.ltm.size
    assert 0 < m < K0
    ids = random_ids(10, seed=4)
    rows, positions = [], []
    for l in range(memory.num_layers):
        ltm_rows, _, ages = memory.ltm.view(l)
        oldest_first = torch.argsort(ages, stable=True).flip(0)
        rows.append(torch.cat([ltm_rows[oldest_first], memory.rows[l]]))
        positions.append(torch.cat([torch.arange(1 + K0 - m, 1 + K0), 1 + K0 + memory.ranks[l]]))
    view = ReadView(rows=torch.stack(rows), positions=torch.stack(positions), query_start=1 + K0 + N,
                    adapter=model.read_adapter)
    with torch.no_grad():
        expected = model._logits(model._read_layers(view, model._embed(ids), MemoryKVCache(len(model.layers))))
    torch.testing.assert_close(model.read(memory, ids), expected, rtol=1e-5, atol=1e-5)


def test_retrieval_queries_go_through_the_layers_input_rmsnorm(tiny_model):
    # The picked rows are the top K0 of mean sigmoid(f_q(RMSNorm_in(h)) . key), also for states far from unit RMS
    # and norm weights far from 1 (where the official fixtures cannot tell the norm from none).
    model = tiny_model
    memory = filled(model, chunks=6)
    K0, d = model.config.ltm_read_rows, model.config.hidden_size
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.layers:
            layer.input_layernorm.weight.copy_(torch.rand(d, generator=g) * 2 + 0.1)
        h = torch.randn(2, 6, d, generator=g) * torch.tensor([0.05, 40.0])[:, None, None]
        for l, layer in enumerate(model.layers):
            picked, rescaled = [], []
            MPlus._retrieve(layer, l, h, memory.ltm, K0, picked)
            _, keys, ages = memory.ltm.view(l)
            want = select_oldest_first(mean_sigmoid_scores(layer.retriever.query_proj(layer.input_layernorm(h)), keys),
                                       ages, K0)
            assert torch.equal(picked[0], want), l
            MPlus._retrieve(layer, l, h * 25, memory.ltm, K0, rescaled)   # RMSNorm: the states' scale does not matter
            assert torch.equal(rescaled[0], want), l
