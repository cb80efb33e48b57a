"""Readers of the evaluation data in their real on-disk formats, distractor construction and the long-context input
builder."""

import json
import random

import numpy as np
import pytest

from mplus_lightning.data.eval_sets.longbench import (
    MAX_NEW_TOKENS,
    PROMPTS,
    QA_SUBSETS,
    build_long_input,
    fill,
    load_prompts,
    read_longbench,
    truncate,
)
from mplus_lightning.data.eval_sets.longbook import read_event_qa, read_longbook_qa
from mplus_lightning.data.eval_sets.retention import (
    build_distractors,
    load_retention_set,
    read_nq,
    read_processed,
    read_squad,
)
from mplus_lightning.data.files import DataFormatError
from tests.test_eval_fixtures import (
    nq_dev_line,
    nq_train_line,
    squad_json,
    write_event_qa,
    write_jsonl,
    write_longbench,
    write_longbook,
    write_squad,
)


def words(text):  # a whitespace "tokenizer" with one id per word
    return [hash(w) % 1000 + 3 for w in text.split()]


# ---- retention ---------------------------------------------------------------------------------------------------
def test_squad_flattens_answerable_questions_and_index_selects(tmp_path):
    d = write_squad(tmp_path / "squad", n_dev=5, index=[4, 0, 2])
    items = read_squad(d / "dev-v2.0.json")
    assert [it.id for it in items] == ["q0", "q1", "q2", "q3", "q4"]      # impossible questions skipped
    assert items[1].answer == "Berlin" and "The capital is Berlin." in items[1].context
    rs = load_retention_set(d)
    assert rs.name == "squad" and [it.id for it in rs.items] == ["q4", "q0", "q2"]
    assert rs.distractor_source == "squad_train" and rs.distractor_path.name == "train-v2.0.json"
    assert rs.context_template == "Context: {context}" and rs.question_template == "Questions: {question} Answer:"
    assert [it.id for it in load_retention_set(d, num_items=2).items] == ["q4", "q0"]
    assert len(load_retention_set(d, index="none").items) == 5


def test_squad_index_out_of_range_and_malformed_file(tmp_path):
    d = write_squad(tmp_path / "squad", n_dev=3, index=[0, 7])
    with pytest.raises(DataFormatError, match=r"indices_squad_3.npy.*\[7\].*3 items"):
        load_retention_set(d)
    bad = tmp_path / "bad" / "dev-v2.0.json"
    bad.parent.mkdir()
    bad.write_text('{"data": [ {"paragraphs": [}')
    with pytest.raises(DataFormatError, match=r"dev-v2.0.json:1: malformed JSON"):
        read_squad(bad)
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
    with pytest.raises(DataFormatError, match=r"paragraphs\[0\].*missing field.*context"):
        read_squad(bad)


@pytest.mark.parametrize("gz", [False, True])
def test_nq_dev_and_train_formats(tmp_path, gz):
    nq = tmp_path / "data" / "nq"
    name = "v1.0-simplified_nq-dev-all.jsonl" + (".gz" if gz else "")
    write_jsonl(nq / name, [
        nq_dev_line(0, "who wrote hamlet", ["Hamlet", "was", "written", "by", "William", "Shakespeare"], (4, 6)),
        nq_dev_line(1, "no short answer", ["some", "text"], None),
        nq_dev_line(2, "capital of france", ["Paris", "is", "the", "capital"], (0, 1)),
    ], gz=gz)
    items = read_nq(nq / name)
    assert [it.id for it in items] == ["1000", "1002"]                     # the line without a short answer is skipped
    assert items[0].context == "Hamlet was written by William Shakespeare"  # HTML tokens removed
    assert items[0].answer == "William Shakespeare" and items[1].answer == "Paris"
    np.save(nq / "indices_nq_4.npy", np.array([1]))
    # the paper's default: SQuAD-train distractors, found in ../squad
    write_squad(tmp_path / "data" / "squad", n_dev=2)
    rs = load_retention_set(tmp_path / "data", dataset="nq")
    assert rs.name == "nq" and [it.answer for it in rs.items] == ["Paris"]
    assert rs.distractor_source == "squad_train" and rs.distractor_path.parent.name == "squad"
    assert rs.question_template == "Questions: {question}? Answer:"
    # the official NQ script's choice: NQ-train long answers (document_text format)
    write_jsonl(nq / "v1.0-simplified_simplified-nq-train.jsonl",
                [nq_train_line(0, ["alpha", "beta", "<b>", "gamma"]), nq_train_line(1, ["delta"])])
    rs = load_retention_set(nq, distractors="nq_train")
    assert list(rs.distractor_texts()) == ["alpha beta gamma", "delta"]


def test_nq_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "nq" / "v1.0-simplified_nq-dev-all.jsonl"
    write_jsonl(p, [nq_dev_line(0, "q", ["a", "b"], (0, 1))])
    with open(p, "a") as f:
        f.write('{"question_text": "broken", \n')
    with pytest.raises(DataFormatError, match=r"nq-dev-all.jsonl:2: malformed JSON"):
        read_nq(p)
    write_jsonl(p, [{"question_text": "q"}])
    with pytest.raises(DataFormatError, match=r"nq-dev-all.jsonl:1: missing field.*annotations"):
        read_nq(p)


def test_processed_layout(tmp_path):
    d = tmp_path / "squad"
    d.mkdir()
    (d / "val_data.json").write_text(json.dumps([
        {"context": "C1", "question": "Q1", "answer": "A1"}, {"ctx": "C2", "q": "Q2", "a": "A2"}]))
    (d / "unrelated_contexts_from_train.json").write_text(json.dumps(["u1", "u2", "u3"]))
    assert [(i.context, i.question, i.answer) for i in read_processed(d / "val_data.json")] == \
        [("C1", "Q1", "A1"), ("C2", "Q2", "A2")]                         # values in order, whatever the keys
    rs = load_retention_set(d)
    assert rs.name == "processed" and rs.distractor_source == "processed"
    assert list(rs.distractor_texts()) == ["u1", "u2", "u3"]
    assert rs.question_template == "Question: {question} Answer:" and rs.context_template == "{context}"
    (d / "val_data.json").write_text(json.dumps([{"context": "C1", "question": 3}]))
    with pytest.raises(DataFormatError, match="entry 0 must hold three strings"):
        read_processed(d / "val_data.json")


def test_missing_retention_data_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*dev-v2.0.json.*val_data.json"):
        load_retention_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)no retention data in .*empty.*v1.0-simplified_nq-dev-all.jsonl"):
        load_retention_set(tmp_path / "empty")
    d = write_squad(tmp_path / "squad", n_dev=2)
    (d / "train-v2.0.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"squad_train distractors .*train-v2.0.json \(set distractor_path"):
        load_retention_set(d)


def test_distractor_concatenation_rule():
    texts = ["a b c", "d e", "f g h i", "j", "k l m n o p", "q"]
    # concatenate until >= 5 words, cut to 4: "a b c d e" -> 4; "f g h i j" -> 4; "k..p" -> 4; leftover "q" kept
    ds = build_distractors(texts, words, total_tokens=10 ** 6, min_tokens=5, max_tokens=4)
    assert [len(d) for d in ds] == [4, 4, 4, 1]
    assert ds[0] == words("a b c d")
    # stops once the requested total is reached
    assert len(build_distractors(texts, words, total_tokens=5, min_tokens=5, max_tokens=4)) == 2
    # official SQuAD rule on real-looking text: >= 768 then 512
    rng = random.Random(0)
    paras = [p["context"] for p in squad_json(rng, 100)["data"][0]["paragraphs"]]
    ds = build_distractors(paras, words, total_tokens=1000, min_tokens=768, max_tokens=512)
    assert all(len(d) == 512 for d in ds) and sum(map(len, ds)) >= 1000


# ---- LongBook ----------------------------------------------------------------------------------------------------
def test_longbook_qa_reader(tmp_path):
    p = write_longbook(tmp_path / "longbook_qa_eng.jsonl", n=2)
    items = read_longbook_qa(tmp_path)                                   # a directory holding the file works too
    assert [it.id for it in items] == ["0", "1"] and items[1].answers == ["Berlin"]
    assert items[0].question == "Where did the hero go?"
    prompt = items[0].prompt()
    assert prompt.startswith("Read the book and answer the question.") and prompt.endswith(
        "Question: Where did the hero go?\nAnswer:")
    with open(p, "a") as f:
        f.write(json.dumps({"id": 9, "context": "c", "question": "old style?", "answer": "x"}) + "\n")
        f.write("not json\n")
    with pytest.raises(DataFormatError, match=r"longbook_qa_eng.jsonl:4: malformed JSON"):
        read_longbook_qa(p)
    write_jsonl(p, [{"id": 1, "context": "c", "input": "q", "answer": []}])
    with pytest.raises(DataFormatError, match=r":1: `answer` must be a non-empty list"):
        read_longbook_qa(p)
    with pytest.raises(FileNotFoundError, match="longbook_qa_eng.jsonl"):
        read_longbook_qa(tmp_path / "missing")


def test_event_qa_reader(tmp_path):
    p = write_event_qa(tmp_path / "ev.jsonl", n=2)
    items = read_event_qa(p)
    assert len(items) == 2 and items[1].answer == 1 and len(items[0].options) == 6
    prompt = items[0].prompt()
    assert "1. " in prompt and "\nF. " in prompt and prompt.endswith("Answer:")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text("the whole book")
    write_jsonl(p, [{"context_file": "books/b.txt", "past_events": ["e1"], "options": ["x", "y"], "answer": "y"}])
    it = read_event_qa(p)[0]
    assert it.context == "the whole book" and it.answer == 1
    write_jsonl(p, [{"context": "c", "options": ["x", "y"], "answer": 5}])
    with pytest.raises(DataFormatError, match=r"ev.jsonl:1: `answer` must be an option index"):
        read_event_qa(p)


# ---- LongBench ---------------------------------------------------------------------------------------------------
def test_longbench_reader_prompts_and_table(tmp_path):
    d = write_longbench(tmp_path / "lb", subsets=("hotpotqa", "qasper"), n=2)
    data = read_longbench(d, ["hotpotqa", "qasper"])
    assert list(data) == ["hotpotqa", "qasper"] and data["qasper"][1].answers == ["Berlin", "city of Berlin"]
    assert data["hotpotqa"][0].id == "hotpotqa-0"
    # data.zip layout: DIR/data/{subset}.jsonl
    write_longbench(tmp_path / "zip" / "data", subsets=("musique",), n=1)
    assert len(read_longbench(tmp_path / "zip", ["musique"])["musique"]) == 1
    with pytest.raises(FileNotFoundError, match=r"subset 'narrativeqa' not found.*\{subset\}.jsonl"):
        read_longbench(d, ["narrativeqa"])
    # the official templates and limits of the six QA subsets
    assert set(QA_SUBSETS) == set(PROMPTS) == set(MAX_NEW_TOKENS)
    assert MAX_NEW_TOKENS == {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32,
                              "2wikimqa": 32, "musique": 32}
    assert PROMPTS["hotpotqa"].endswith("Question: {input}\nAnswer:") and PROMPTS["hotpotqa"] == PROMPTS["musique"]
    assert PROMPTS["narrativeqa"].count("asconcisely") == 2                # the official typo, kept
    assert PROMPTS["qasper"].count("\"unanswerable\"") == 4
    prompt = data["hotpotqa"][0].prompt(PROMPTS["hotpotqa"])
    assert "{context}" not in prompt and prompt.endswith("Question: What is the capital 0?\nAnswer:")
    assert fill("a {context} b", context="x {input} {y}") == "a x {input} {y} b"   # braces in a context survive
    over = tmp_path / "p.json"
    over.write_text(json.dumps({"hotpotqa": "Q: {input} C: {context}"}))
    assert load_prompts(over)["hotpotqa"] == "Q: {input} C: {context}" and load_prompts(None) == PROMPTS
    bad = tmp_path / "bad"
    write_jsonl(bad / "hotpotqa.jsonl", [{"input": "q", "context": "c"}])
    with pytest.raises(DataFormatError, match=r"hotpotqa.jsonl:1: missing field.*answers"):
        read_longbench(bad, ["hotpotqa"])


# ---- the input builder ------------------------------------------------------------------------------------------
def test_long_input_8k_arithmetic_of_the_paper():
    ids = list(range(3, 10_003))                                           # 10,000 tokens
    li = build_long_input(ids, gen_tokens=32, window_tokens=2048, chunk_tokens=512, max_length=8192)
    kept = ids[-(8192 - 32):]                                              # tail truncation to max_length - gen
    assert li.truncated == 10_000 - 8160 and li.total == 10_000
    assert li.window == kept[-2016:]                                       # 2,048 - 32 in the window
    assert [len(c) for c in li.chunks] == [512] * 12                       # 12 x 512 injected (paper §4.4)
    assert sum(li.chunks, []) + li.window == kept                          # oldest first, nothing lost or repeated


def test_long_input_short_first_chunk_bos_and_middle():
    ids = list(range(10, 10 + 100))
    li = build_long_input(ids, gen_tokens=4, window_tokens=24, chunk_tokens=32)
    # 80 tokens before the window, cut from the end backwards: 16 | 32 | 32
    assert [len(c) for c in li.chunks] == [16, 32, 32] and li.window == ids[-20:]
    li = build_long_input(ids, gen_tokens=4, window_tokens=24, chunk_tokens=36)
    # 80 = 8 | 36 | 36: the 8-token oldest piece is merged into the next chunk
    assert [len(c) for c in li.chunks] == [44, 36] and sum(li.chunks, []) == ids[:80]
    li = build_long_input([1] + ids[:10], gen_tokens=2, window_tokens=8, bos_token_id=1)
    assert 1 not in li.window and 1 not in sum(li.chunks, []) and li.total == 10
    assert build_long_input(ids[:5], gen_tokens=2, window_tokens=8).chunks == []
    assert truncate(ids, 10, "middle") == ids[:5] + ids[-5:]
    assert truncate(ids, 10, "tail") == ids[-10:] and truncate(ids, None) == ids
    with pytest.raises(ValueError, match="window_tokens"):
        build_long_input(ids, gen_tokens=8, window_tokens=8)


def test_an_nq_answer_is_the_first_short_answer(tmp_path):
    # as the official loader: annotations[0].short_answers[0]; the context is the long answer without HTML tokens
    tokens = ["<P>", "Paris", "is", "the", "capital", "of", "France", "</P>"]
    line = {"example_id": 7, "question_text": "capital of france",
            "document_tokens": [{"token": t, "html_token": t.startswith("<")} for t in tokens],
            "annotations": [{"long_answer": {"start_token": 0, "end_token": 8},
                             "short_answers": [{"start_token": 1, "end_token": 2},
                                               {"start_token": 6, "end_token": 7}]}]}
    path = tmp_path / "nq.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (item,) = read_nq(path)
    assert item.answer == "Paris" and item.context == "Paris is the capital of France"
