"""The CPU demo: the facts corpus, its DataModule and a miniature run of the whole pipeline (`--quick`)."""
import json
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mplus_lightning import config as C
from mplus_lightning.data import facts as F
from mplus_lightning.data.eval_sets.retention import load_retention_set

ROOT = Path(__file__).parents[1]


def names(people):
    return {(p.first, p.last) for p in people}


def test_corpus_is_a_function_of_the_seed():
    a, b, c = F.generate_corpus(1), F.generate_corpus(1), F.generate_corpus(2)
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()
    assert F.FactCorpus.from_json(json.loads(json.dumps(a.to_json()))).to_json() == a.to_json()


def test_held_out_people_are_never_training_people(corpus_dir):
    corpus = F.load_corpus(corpus_dir)
    train, val, held = names(corpus.train), names(corpus.val), names(corpus.heldout)
    assert len(held) == len(corpus.heldout) == 200 and len(train) == len(corpus.train) > 1000
    assert not train & held and not train & val and not val & held
    # ...nor in anything training or the evaluation's distractors read
    held_names = {f"{a} {b}" for a, b in held}
    distractors = json.loads((corpus_dir / "retention" / "unrelated_contexts_from_train.json").read_text())
    assert distractors and not any(n in d for d in distractors for n in held_names)
    dm = F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), num_facts=[4], num_questions=3)
    stream = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    for k in range(100):
        s = stream.sample(k)
        text = " ".join(dm.tokenizer.decode(c) for c in s.contexts) + dm.tokenizer.decode(s.target)
        assert not any(n in text for n in held_names), text


def test_every_answer_is_in_its_fact(corpus_dir):
    corpus = F.load_corpus(corpus_dir)
    for p in corpus.train[:300] + corpus.heldout:
        # the answer is what follows the name in the fact: the token after the question's last one
        assert p.fact() == f"Fact: {p.name} {p.value}." and p.value == p.answer(p.told)
        assert p.question() == f"Recall: {p.name}" and p.value not in p.question()
    items = json.loads((corpus_dir / "retention" / "val_data.json").read_text())
    assert len(items) == len(corpus.heldout)
    assert all(it["answer"] in it["context"] for it in items)
    assert all(it["question"] == f"Recall: {p.name}" for it, p in zip(items, corpus.heldout))
    # the held-out facts tell city, year, employer in turn
    assert [p.told for p in corpus.heldout[:6]] == list(F.ATTRIBUTES) * 2
    assert [it["answer"] for it in items[:3]] == [corpus.heldout[0].city, corpus.heldout[1].year,
                                                  corpus.heldout[2].employer]
    assert {p.told for p in corpus.train} == set(F.ATTRIBUTES)


def test_the_evaluation_reads_the_generated_layout(corpus_dir):
    template = OmegaConf.load(ROOT / "experiments" / "demo_eval.yaml")["question_template"]
    rset = load_retention_set(corpus_dir / "retention", dataset="processed", index="none", num_items=None,
                              question_template=template)
    assert rset.name == "processed" and len(rset.items) == 200
    first = F.load_corpus(corpus_dir).heldout[0]
    assert (rset.items[0].context, rset.items[0].answer) == (first.fact(), first.value)
    assert rset.question_template == F.QUESTION_TEMPLATE    # training targets use the evaluation's prompt
    assert next(iter(rset.distractor_texts())) in {p.fact() for p in F.load_corpus(corpus_dir).train}


def test_samples_mask_the_question_and_keep_the_answer(corpus_dir):
    dm = F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), num_facts=[1, 3], num_questions=2,
                           vocab_size=1024, seed=3)
    dm.setup()
    tok, corpus = dm.tokenizer, dm.corpus
    stream = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    seen_counts = set()
    for k in range(40):
        s = stream.sample(k)
        seen_counts.add(len(s.contexts))
        assert isinstance(s, F.FactSample) and s.target_mask.dtype == torch.bool
        assert s.target_mask.shape == s.target.shape
        assert all(len(c) == 6 for c in s.contexts)         # one fact = one block of K=6 rows
        facts = [tok.decode(c) for c in s.contexts]
        assert all(f in {p.fact() for p in corpus.train} for f in facts)
        # the masked-in tokens are exactly " <answer></s>" for each question; the prompts are masked out
        pieces = tok.decode(s.target[s.target_mask]).split("</s>")[:-1]
        assert len(pieces) == min(2, len(s.contexts))          # at most one question per fact
        assert pieces[0] == " " + s.answer
        assert all(any(p.strip() + "." in f for f in facts) for p in pieces)
        assert "Recall:" in tok.decode(s.target[~s.target_mask]) and not s.target_mask[0]
        assert s.target[-1] == tok.eos_token_id and s.target_mask[-1]
    assert seen_counts == {1, 3}
    # deterministic and resumable: sample k does not depend on where the stream started
    again = dm.build_train_dataset(rank=0, world_size=1, skip=7)
    first = next(iter(again))
    assert torch.equal(first.target, stream.sample(7).target) and first.position == 7
    # Lightning moves batches with .to(): the mask must survive
    assert torch.equal(s.to("cpu").target_mask, s.target_mask)


def test_repeat_samples_and_resume_position(corpus_dir):
    tok = str(corpus_dir / "tokenizer")
    never = F.FactsDataModule(str(corpus_dir), tok, repeat_ratio=0.0).build_train_dataset(skip=0)
    always = F.FactsDataModule(str(corpus_dir), tok, repeat_ratio=1.0).build_train_dataset(skip=0)
    half = F.FactsDataModule(str(corpus_dir), tok, repeat_ratio=0.5).build_train_dataset(skip=0)
    assert not any(never.sample(k).repeat for k in range(30)) and all(always.sample(k).repeat for k in range(30))
    assert 5 < sum(half.sample(k).repeat for k in range(40)) < 35
    with pytest.raises(ValueError, match="repeat_ratio"):
        F.FactsDataModule(str(corpus_dir), tok, repeat_ratio=1.5)
    # a checkpoint's data position: the next sample after a resume is the one the interrupted run would have seen
    dm = F.FactsDataModule(str(corpus_dir), tok, seed=4)
    dm.load_state_dict({**dm.state_dict(), "samples_consumed": 11})
    resumed = next(iter(dm.train_dataloader()))
    assert resumed.position == 11
    assert torch.equal(resumed.target, F.FactsDataModule(str(corpus_dir), tok, seed=4).build_train_dataset(
        skip=0).sample(11).target)


def test_validation_samples_score_the_answer_alone(corpus_dir):
    dm = F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), val_samples=4, val_num_facts=2)
    val = dm.val_samples()
    assert len(val) == 4
    for s in val:
        assert tok_text(dm, s.target[s.target_mask]) == " " + s.answer        # no EOS in the score
        people = {p.fact() for p in dm.corpus.val}
        assert all(tok_text(dm, c) in people for c in s.contexts)
        # the question is about the oldest injected fact
        assert s.answer in tok_text(dm, s.contexts[0])


def tok_text(dm, ids):
    return dm.tokenizer.decode(ids)


def test_the_training_step_uses_the_mask(corpus_dir):
    from mplus_lightning.stages.step import target_sequence

    cfg = C.load(ROOT / "experiments" / "demo_stage1.yaml",
                 [f"data.params.corpus={corpus_dir}", f"data.params.tokenizer={corpus_dir / 'tokenizer'}"])
    dm = F.FactsDataModule(**cfg.data.params)
    stream = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    s = next(s for s in map(stream.sample, range(20)) if not s.repeat)
    ids, mask = target_sequence(s, s.contexts, instruction_ids=[5, 6], max_seq_length=cfg.step.max_seq_length,
                                mask_extra_tokens=cfg.step.mask_extra_tokens)
    assert torch.equal(mask, s.target_mask) and torch.equal(ids, s.target)


def test_the_retriever_is_trained_to_find_the_asked_answer_rows(corpus_dir):
    # The retriever's positives are the rows written at the answer tokens of the fact the first question asks about,
    # its query that question's prompt ("Recall: <name>"); repeat samples (about every fact) keep the document
    # labels: every row written.
    from mplus_lightning.stages.step import retrieval_labels

    dm = F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), num_facts=[3], num_questions=2,
                           repeat_ratio=0.3)
    stream = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    K = 6
    seen_repeat = False
    for k in range(30):
        s = stream.sample(k)
        if s.repeat:
            seen_repeat = True
            assert s.retrieval_positives is None
            labels = retrieval_labels(s, [0, 1, 2], K)
            assert labels.query_tokens is None and all(r.all() for r in labels.rows)
            continue
        marked = [i for i, p in enumerate(s.retrieval_positives) if p.any()]
        assert len(marked) == 1
        asked_index = marked[0]
        asked = s.contexts[asked_index]
        prompt = dm.tokenizer.decode(s.target[:s.retrieval_query_tokens])
        assert prompt.startswith("Recall:") and prompt.split("Recall:")[1].strip() in dm.tokenizer.decode(asked)
        labels = retrieval_labels(s, [0, 1, 2], K)
        assert labels.query_tokens == s.retrieval_query_tokens
        rows = labels.rows[asked_index]
        assert len(rows) == K == len(asked)   # one label per row; the demo's facts are exactly K tokens
        answer_rows = rows.nonzero()[:, 0]
        assert len(answer_rows) and dm.tokenizer.decode(asked[answer_rows]).strip() == s.answer
        assert all(not r.any() for i, r in enumerate(labels.rows) if i != asked_index)
        # only the last two facts injected: the asked one may be among them or not
        labels = retrieval_labels(s, [1, 2], K)
        if asked_index >= 1:
            assert torch.equal(labels.rows[asked_index - 1], rows) and not labels.rows[2 - asked_index].any()
            assert labels.query_tokens == s.retrieval_query_tokens
        else:
            assert all(r.all() for r in labels.rows) and labels.query_tokens is None
    assert seen_repeat


def test_the_repeat_target_is_built_on_the_batch_device(corpus_dir):
    # On a GPU the chunks arrive on cuda; the "meta" device stands in for it here (a CPU tensor mixed in fails,
    # as it did on an H100: torch.cat of the CPU instruction ids with cuda chunks).
    from mplus_lightning.stages.step import target_sequence

    cfg = C.load(ROOT / "experiments" / "demo_stage1.yaml",
                 [f"data.params.corpus={corpus_dir}", f"data.params.tokenizer={corpus_dir / 'tokenizer'}"])
    dm = F.FactsDataModule(**cfg.data.params)
    s = dm.build_train_dataset(rank=0, world_size=1, skip=0).sample(0)
    s.repeat = True
    ids, mask = target_sequence(s, [c.to("meta") for c in s.contexts], instruction_ids=[5, 6],
                                max_seq_length=cfg.step.max_seq_length, mask_extra_tokens=cfg.step.mask_extra_tokens)
    assert ids.device.type == "meta" and ids.shape[0] == 2 + sum(len(c) for c in s.contexts)
    assert mask.device.type == "meta"


def test_bad_parameters_are_named(corpus_dir):
    with pytest.raises(ValueError, match="ask"):
        F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), ask="middle")
    with pytest.raises(ValueError, match="num_facts"):
        F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), num_facts=[0])
    with pytest.raises(FileNotFoundError, match="facts corpus"):
        F.load_corpus(corpus_dir / "nowhere")
    old = json.loads((corpus_dir / F.CORPUS_FILE).read_text())
    old["template"] = "Fact: {name} was born in {city} in {year} and now works for {employer}."
    with pytest.raises(ValueError, match="regenerate"):                   # a corpus of an earlier version
        F.FactCorpus.from_json(old)
    with pytest.raises(ValueError, match="num_questions"):
        F.make_fact_sample(F.load_corpus(corpus_dir).train, random.Random(0), None, num_facts=1, num_questions=0)
    with pytest.raises(ValueError, match="namesake_ratio"):
        F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), namesake_ratio=1.5, fresh_attributes=True)
    with pytest.raises(ValueError, match="fresh_attributes"):
        F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), namesake_ratio=0.5)


def test_namesake_samples_hold_people_who_share_a_name(corpus_dir):
    # namesake_ratio=1: every fact of a sample shares the first or last name of one of them (the anchor), so the
    # asked person's namesake is in memory; the names are distinct people.
    dm = F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), num_facts=[4], fresh_attributes=True,
                           namesake_ratio=1.0)
    on = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    shared = 0
    for k in range(20):
        names = [dm.tokenizer.decode(c).replace("Fact:", "").split()[:2] for c in on.sample(k).contexts]
        assert len({tuple(n) for n in names}) == 4
        anchors = [a for a in names if all(b is a or b[0] == a[0] or b[1] == a[1] for b in names)]
        shared += bool(anchors)
    assert shared == 20


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    from mplus_lightning import demo

    summary = demo.run_demo(tmp_path / "out", tmp_path / "data", quick=True, seed=2)
    out = capsys.readouterr().out
    ret = tmp_path / "out" / "retention"
    results = json.loads((ret / "results.json").read_text())
    assert set(results["modes"]) == {"mplus", "memoryllm"} and results["num_items"] == 3
    assert results["distances"] == [0, 12, 48]
    assert (ret / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((ret / "tensorboard").iterdir())
    assert not (tmp_path / "out" / "runs" / "pretrain").exists()    # stage 1 starts from the committed backbone
    for stage in ("stage1", "stage2", "ltm"):
        assert (tmp_path / "out" / "runs" / stage / "export" / "config.json").is_file()
        assert any((tmp_path / "out" / "runs" / stage / "tensorboard").iterdir())
    assert (tmp_path / "data" / "retention" / "val_data.json").is_file()
    saved = json.loads((tmp_path / "out" / "demo_summary.json").read_text())
    assert [r["distance"] for r in saved["rows"]] == [0, 12, 48]
    assert saved["rows"][1]["stm_share"] == pytest.approx((5 / 6) ** 2)  # N=36 rows, K=6: 2 facts in 12 tokens
    assert set(saved["targets"]) == {"total_minutes", "distance0", "far", "farthest"}
    assert saved["targets"]["farthest"]["distance"] is None       # 48 tokens leave 23% of the rows: not that far
    assert set(summary["timings_s"]) == {"data", "stage1", "stage2", "ltm", "eval"}
    for needle in ("distance (tokens)", "MemoryLLM mode", "target:", "retention.png", "[stage1] step", "[ltm] step"):
        assert needle in out, needle
    # the seed draws the corpus and the memory stages' seed; the tokenizer is the backbone's
    assert saved["seed"] == 2 and saved["backbone"]["sha256"] == demo.check_backbone(demo.BACKBONE)
    assert (tmp_path / "data" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (demo.BACKBONE / "tokenizer.json").read_bytes()
    assert F.load_corpus(tmp_path / "data").heldout == F.generate_corpus(2).heldout
    stage1 = OmegaConf.load(tmp_path / "out" / "runs" / "stage1" / "config.yaml")
    assert stage1.trainer.seed == demo.STAGE_SEED + 2
    # called in this process, the demo cannot pin torch's kernels: it says whether the environment was pinned
    pinned = demo.environment_is_pinned()
    assert ("pinned for a reproducible table" in out) == pinned
    assert ("NOT in the pinned environment" in out) == (not pinned)
    assert saved["environment"]["torch"] == torch.__version__


def test_newest_fact_answers_counts_answers_taken_from_the_latest_distractor(corpus_dir, tmp_path):
    from mplus_lightning import demo

    corpus = F.load_corpus(corpus_dir)
    distractors = json.loads((corpus_dir / "retention" / "unrelated_contexts_from_train.json").read_text())
    by_text = {p.fact(): p for p in corpus.train}
    first, second = by_text[distractors[0]], by_text[distractors[1]]
    asked = corpus.heldout[0]
    rec = {"kind": "mplus", "question": asked.question(), "answer": asked.value, "points": [
        {"distance": 0, "injections": 0, "prediction": f" {asked.value}"},
        {"distance": 6, "injections": 1, "prediction": f" {first.value}"},      # the newest fact's answer
        {"distance": 12, "injections": 2, "prediction": f" {first.value}"}]}    # not the newest any more
    other = dict(rec, points=[
        {"distance": 6, "injections": 1, "prediction": f" {asked.value}"},
        {"distance": 12, "injections": 2, "prediction": f" {second.value}"}])
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(r) for r in (rec, other, {"kind": "borderline", "id": "0"})) + "\n")
    shares = demo.newest_fact_answers(items, corpus_dir)
    assert shares == {"mplus": {6: 0.5, 12: 0.5 if first.value != second.value else 1.0}}


def test_seed_table_gives_median_and_range_per_distance(tmp_path, capsys):
    from mplus_lightning import demo

    def run(far_mplus: float, near: float) -> dict:
        rows = [{"distance": 0, "stm_share": 1.0, "mplus": 1.0, "memoryllm": 1.0},
                {"distance": 78, "stm_share": 0.093, "mplus": far_mplus, "memoryllm": near}]
        return {"rows": rows, "targets": {"far": {"value": {"mplus": far_mplus, "memoryllm": near}}}}

    runs = [run(0.8, 0.1), run(0.2, 0.05), run(0.6, 0.2)]
    table, median = demo.seed_table(runs)
    assert median == 2   # M+ at 78 tokens: 0.2 < 0.6 < 0.8
    assert "| M+: median (range) | 1.00 (1.00-1.00) | 0.60 (0.20-0.80) |" in table
    assert "| MemoryLLM mode: median (range) | 1.00 (1.00-1.00) | 0.10 (0.05-0.20) |" in table
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "demo_summary.json").write_text(json.dumps(r))
    assert demo.main(["--collect", *(str(tmp_path / str(i)) for i in range(3))]) == 0
    assert f"median run (by M+ at the far distance): {tmp_path / '2'}" in capsys.readouterr().out
    runs[1]["rows"][1]["distance"] = 96
    with pytest.raises(ValueError, match="different distances"):
        demo.seed_table(runs)


def test_recall_documents_are_six_token_sentences_about_earlier_facts(corpus_dir):
    from mplus_lightning.data.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(corpus_dir / "tokenizer")
    docs = [json.loads(line)["text"] for line in (corpus_dir / F.RECALL_DOCUMENTS).read_text().splitlines()]
    assert len(docs) == 20
    for doc in docs[:3]:
        sentences = [s + "." for s in doc.split(".") if s]
        assert len(encode(tok, doc)) == 6 * len(sentences) == 6 * 80   # chunk_tokens=6 reads one sentence a chunk
        told = {}
        for s in sentences:
            kind, rest = s.split(": ")
            first, last, value = rest[:-1].split(" ")
            if kind == "Fact":
                told[(first, last)] = value
            else:
                assert kind == "Recall" and told[(first, last)] == value   # about a fact told earlier, its value
        assert len(told) < len(sentences)


@pytest.mark.slow
def test_the_backbone_is_regenerated_by_the_pretrain_stage_and_the_demo_starts_from_it(tmp_path, capsys):
    from safetensors.torch import load_file

    from mplus_lightning import demo

    backbone = tmp_path / "backbone"
    made = demo.make_backbone(backbone, tmp_path / "work", quick=True)
    assert made["previous_sha256"] is None and not made["identical"]
    assert sorted(p.name for p in backbone.iterdir()) == sorted(demo.BACKBONE_FILES)
    assert made["sha256"] == demo.check_backbone(backbone)
    # the committed backbone is such a pretrain export: the same tensors, shapes and config
    ours, committed = load_file(backbone / "model.safetensors"), load_file(demo.BACKBONE / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in committed.items()}
    assert json.loads((backbone / "config.json").read_text()) == json.loads((demo.BACKBONE / "config.json").read_text())
    # regenerated again (the same quick pretrain), it is byte-identical and says so
    again = demo.make_backbone(backbone, tmp_path / "work", quick=True)
    assert again["identical"] and again["sha256"] == made["sha256"]
    assert "byte-identical to the one it replaced" in capsys.readouterr().out
    # the demo starts from the backbone it is given
    summary = demo.run_demo(tmp_path / "out", tmp_path / "data", quick=True, backbone=backbone)
    assert summary["backbone"] == {"path": str(backbone), "sha256": made["sha256"]}
    stage1 = OmegaConf.load(tmp_path / "out" / "runs" / "stage1" / "config.yaml")
    assert stage1.init_from == str(backbone)


def test_a_missing_backbone_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    from mplus_lightning import demo

    (tmp_path / "bb").mkdir()
    (tmp_path / "bb" / "config.json").write_text("{}")
    assert demo.main(["--quick", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
                      "--backbone", str(tmp_path / "bb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.safetensors" in err and "make demo-backbone" in err
    assert not (tmp_path / "o").exists()     # nothing was trained or written


def test_a_tokenizer_that_splits_a_fact_is_refused_before_training(tmp_path):
    from mplus_lightning import demo
    from mplus_lightning.data.tokenizer import train_tiny_tokenizer

    # too few merges for every name to be one token: a fact would no longer be one memory block
    train_tiny_tokenizer(F.tokenizer_texts(F.generate_corpus(0)), 300, tmp_path / "small")
    with pytest.raises(ValueError, match=r"not 6: regenerate the backbone with `make demo-backbone`"):
        demo.prepare_data(tmp_path / "data", 1, tokenizer=tmp_path / "small")
    demo.prepare_data(tmp_path / "data", 1, tokenizer=demo.BACKBONE)     # the committed one writes every fact whole


def test_the_demo_judges_the_issue_targets_at_78_tokens_and_at_the_farthest_distance():
    from types import SimpleNamespace

    from mplus_lightning import demo

    distances = [0, 6, 78, 240]
    injections = [d // 6 for d in distances]

    def results(mplus, memoryllm):
        mode = lambda hits: {"distances": distances, "tokens": distances, "injections": injections,  # noqa: E731
                             "exact_hit": hits}
        return {"modes": {"mplus": mode(mplus), "memoryllm": mode(memoryllm)}, "num_items": 10}

    config = SimpleNamespace(stm_rows=36, num_tokens=6, ltm_read_rows=12)
    good = demo.summarize(results([1.0, 0.9, 0.6, 0.5], [1.0, 0.8, 0.2, 0.1]), config, {}, 600.0)["targets"]
    assert good["far"]["distance"] == 78 and good["farthest"]["distance"] == 240
    assert all(t["met"] for t in good.values())
    # each bound is checked: M+ below 0.60 at 78 tokens, MemoryLLM mode above 0.10 at 240, too slow
    low = demo.summarize(results([1.0, 0.9, 0.59, 0.5], [1.0, 0.8, 0.2, 0.11]), config, {}, 901.0)["targets"]
    assert not low["far"]["met"] and not low["farthest"]["met"] and not low["total_minutes"]["met"]
    assert low["distance0"]["met"]
