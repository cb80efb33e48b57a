"""Evaluation runtime: memory isolation between items, the MemoryLLM mode, and the plain-window backbone."""

import json
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaForCausalLM

from mplus_lightning.eval import runtime
from mplus_lightning.eval.runtime import (
    Backbone,
    EvalInputError,
    RunDir,
    inject,
    item_generator,
    memory_view,
    start_memory,
)
from tests.test_eval_fixtures import (
    make_model,
    one_thread_per_test,  # noqa: F401  (autouse: one torch thread per test)
)


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


def filled(model, seed=0, chunks=8):
    mem = model.new_memory(seed=seed)
    g = torch.Generator().manual_seed(seed)
    for i in range(chunks):
        model.inject(mem, torch.tensor([ids(20, 100 + i)]), generator=g)
    assert mem.ltm.size > 0
    return mem


def same_memory(a, b) -> bool:
    ok = all(torch.equal(x, y) for x, y in ((a.rows, b.rows), (a.ranks, b.ranks), (a.ages, b.ages)))
    if a.ltm is not None:
        ok = ok and a.ltm.size == b.ltm.size and all(torch.equal(x, y) for x, y in zip(
            a.ltm.view(0) + a.ltm.view(1), b.ltm.view(0) + b.ltm.view(1)))
    return ok


def test_items_start_from_an_independent_copy_of_the_checkpoint_memory():
    model = make_model()
    base = filled(model)
    snapshot = base.clone()
    a = start_memory(base)
    inject(model, a, ids(40, 1), item_generator(0, "a"))
    assert not torch.equal(a.rows, base.rows) and a.ltm.size > base.ltm.size   # item A's context went in...
    assert same_memory(base, snapshot)                                          # ...but not into the checkpoint's
    b = start_memory(base)
    assert same_memory(b, snapshot) and b.initialized                          # item B starts clean, never zeroed
    # and what B reads does not depend on whether A ran before
    q = ids(12, 7)
    fresh = model.read(start_memory(snapshot), torch.tensor([q]))
    assert torch.equal(model.read(b, torch.tensor([q])), fresh)


def test_item_generator_is_deterministic_per_key():
    a, b, c = item_generator(0, "x", 1), item_generator(0, "x", 1), item_generator(0, "x", 2)
    ra, rb, rc = (torch.randperm(50, generator=g) for g in (a, b, c))
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)


def test_memoryllm_mode_reads_the_same_pool_without_the_long_term_memory():
    model = make_model()
    mem = filled(model)
    view = memory_view(mem, "memoryllm")
    assert view.rows is mem.rows and view.ltm.size == 0 and mem.ltm.size > 0
    assert memory_view(mem, "mplus") is mem
    q = torch.tensor([ids(10, 3)])
    ref = mem.clone()
    ref.ltm.clear()
    assert torch.allclose(model.read(view, q), model.read(ref, q))
    assert not torch.allclose(model.read(view, q), model.read(mem, q), atol=1e-4)   # the LTM does matter in M+ mode
    # The write pass never reads the long-term memory: the short-term pool evolves identically in both modes, which
    # is why the runners inject once and read twice.
    a, b = start_memory(mem, "mplus"), start_memory(mem, "memoryllm")
    for i in range(4):
        inject(model, a, ids(24, 10 + i), item_generator(0, i))
        inject(model, b, ids(24, 10 + i), item_generator(0, i), mode="memoryllm")
    assert torch.equal(a.rows, b.rows) and torch.equal(a.ranks, b.ranks)
    assert b.ltm.size == 0 and a.ltm.size > mem.ltm.size


def _plain_llama(model):
    hf = LlamaForCausalLM(model.config.llama_config()).eval()
    state = {k.removeprefix("llama.").replace(".base_layer", ""): v for k, v in model.state_dict().items()
             if k.startswith("llama.") and "lora_" not in k and "memory_bos" not in k and ".retriever." not in k}
    hf.load_state_dict(state, strict=True)
    return hf


def test_backbone_equals_the_plain_llama_without_lora(monkeypatch):
    model = make_model()                                       # LoRA B is random: the adapters change outputs
    hf = _plain_llama(model)
    seq = ids(23, 5)
    bos = model.llama.config.bos_token_id
    with torch.no_grad():
        ref = hf(torch.tensor([[bos] + seq])).logits
    bb = Backbone(model, prefill_block=5)
    torch.testing.assert_close(bb.forward_logits(seq), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bb.last_logits(seq), ref[:, -1], atol=1e-5, rtol=1e-4)   # blockwise prefill
    # greedy decoding = recomputing the plain model on the growing sequence
    new = bb.generate(seq, 6)
    cur = [bos] + seq
    with torch.no_grad():
        for _ in range(len(new)):
            cur.append(int(hf(torch.tensor([cur])).logits[0, -1].argmax()))
    assert new == cur[len(seq) + 1:] and len(new) > 0
    # sanity: with an adapter active the same call differs (so the comparison above can fail)
    monkeypatch.setattr(runtime, "BACKBONE_ADAPTER", "read")
    assert not torch.allclose(Backbone(model).forward_logits(seq), ref, atol=1e-4)


@dataclass
class _RunInputs:
    """What a RunDir fingerprints of an evaluation's config."""

    model: str | None = None
    tokenizer: str | None = None
    seed: int = 0


def test_overwrite_discards_the_part_files_an_interrupted_multi_rank_run_left(tmp_path):
    out = tmp_path / "out"
    run = RunDir(out, "retention", _RunInputs(), {"seed": 0}, ("id",))
    run.store.add({"id": "a", "score": 1})
    run.part_file(1).write_text(json.dumps({"id": "b", "score": 2}) + "\n")   # rank 1's results, never merged
    fresh = RunDir(out, "retention", _RunInputs(seed=1), {"seed": 1}, ("id",), overwrite=True)
    assert len(fresh.store) == 0 and not fresh.parts()


def test_results_are_not_resumed_after_a_separate_tokenizer_changed(tmp_path):
    model, tok = tmp_path / "model", tmp_path / "tok"
    model.mkdir()
    tok.mkdir()
    (model / "config.json").write_text("{}")
    (tok / "tokenizer.json").write_text('{"v": 1}')
    inputs = _RunInputs(model=str(model), tokenizer=str(tok))
    RunDir(tmp_path / "out", "retention", inputs, {"seed": 0}, ("id",)).store.add({"id": "a"})
    RunDir(tmp_path / "out", "retention", inputs, {"seed": 0}, ("id",))          # unchanged: resumes
    (tok / "tokenizer.json").write_text('{"v": 2}')
    with pytest.raises(EvalInputError, match=r"contents of the tokenizer: .*tokenizer\.json changed since"):
        RunDir(tmp_path / "out", "retention", inputs, {"seed": 0}, ("id",))
