"""Retention diagnostics: finding a context's rows by their bits, the oracle retrieval, and the end-to-end record."""

import json

import torch

from mplus_lightning.eval.diagnose import find_rows, locate, with_oracle_retrieval
from mplus_lightning.evaluate import main
from mplus_lightning.model.memory import LongTermMemory
from tests.test_eval_retention import args, env  # noqa: F401  (the tiny checkpoint and SQuAD files)
from tests.test_model import filled, random_ids


def test_find_rows_matches_bits_not_fingerprints():
    store = torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 0.0], [1.0, 2.0]])
    # [2, 1] has the bit-pattern sum of [1, 2]: a fingerprint candidate that the full comparison rejects
    assert find_rows(store, torch.tensor([[1.0, 2.0]])).tolist() == [0, 3]
    assert find_rows(store.bfloat16(), torch.tensor([[3.0, 0.0]])).tolist() == [2]   # cast to the store's dtype
    assert find_rows(store[:0], torch.tensor([[1.0, 2.0]])).numel() == 0


def test_rows_are_followed_into_the_long_term_memory(tiny_model):
    mem = tiny_model.new_memory(seed=0)
    g = torch.Generator().manual_seed(0)
    tiny_model.inject(mem, random_ids(20, seed=1), generator=g)
    ctx = random_ids(20, seed=2)
    rows = tiny_model.write(mem, ctx)
    tiny_model.inject(mem, ctx, generator=g)
    K = tiny_model.config.num_tokens
    in_stm, in_ltm = locate(mem, rows)
    assert in_stm == [K] * mem.num_layers and all(i.numel() == 0 for i in in_ltm)
    for i in range(3):
        tiny_model.inject(mem, random_ids(20, seed=10 + i), generator=g)
        in_stm, in_ltm = locate(mem, rows)
        # every row is somewhere, and what left the pool is in the long-term memory, unchanged
        assert [s + len(l) for s, l in zip(in_stm, in_ltm)] == [K] * mem.num_layers
    assert sum(len(l) for l in in_ltm) > 0
    for l, idx in enumerate(in_ltm):
        for j in idx.tolist():
            assert (mem.ltm.view(l)[0][j] == rows[l]).all(-1).any()


def test_oracle_retrieval_reads_the_given_rows_and_leaves_the_memory_alone(tiny_model):
    K0 = tiny_model.config.ltm_read_rows
    mem = filled(tiny_model, chunks=8)
    q = random_ids(10)
    _, before = tiny_model.read(mem, q, return_retrieved=True)
    pinned = []
    for l in range(mem.num_layers):
        others = [j for j in range(len(mem.ltm)) if j not in set(before[l, 0].tolist())]
        assert len(others) >= 3
        pinned.append(torch.tensor(others[:3]))
    oracle = with_oracle_retrieval(mem, pinned)
    _, during = tiny_model.read(oracle, q, return_retrieved=True)
    for l in range(mem.num_layers):
        assert set(pinned[l].tolist()) <= set(during[l, 0].tolist()) and during.shape[-1] == K0
        ages = mem.ltm.view(l)[2][during[l, 0]]
        assert bool((ages[:-1] >= ages[1:]).all()), "still oldest first"
    _, after = tiny_model.read(mem, q, return_retrieved=True)
    assert torch.equal(after, before)
    assert type(mem.ltm) is LongTermMemory and oracle.ltm.rows is mem.ltm.rows   # mem untouched; no copy made


def test_diagnose_records_where_the_context_rows_are(env, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(args(env, out, "num_items=2", "diagnose=true")) == 0
    res = json.loads((out / "results.json").read_text())
    diag = res["modes"]["mplus"]["diagnostics"]
    assert "diagnostics" not in res["modes"]["memoryllm"]
    # distances [0, 64, 128]: right after the context all its rows are in the pool; later they are in one place or
    # the other; retrieved ones are long-term ones
    assert diag["rows_in_stm"][0] == [1.0] * 3 and diag["rows_in_ltm"][0] == [0.0] * 3
    for j in range(3):
        for s, l, r in zip(diag["rows_in_stm"][j], diag["rows_in_ltm"][j], diag["rows_retrieved"][j]):
            assert abs(s + l - 1.0) < 1e-9 and 0.0 <= r <= l
    assert sum(diag["rows_in_ltm"][2]) > 0
    assert all(0.0 <= v <= 1.0 for v in diag["oracle_exact_hit"] + diag["oracle_qa_f1"])
    recs = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert all("oracle_exact_hit" in p for r in recs if r["kind"] == "mplus" for p in r["points"])
