"""Our training step against the official training code's, on the steps it recorded (tests/official_train.py).

Per case directory: our model is loaded from the case's `release/` weights and memory, our step (stages/step.py) is
scripted with the official step's random decisions (step kinds, evicted rows, retriever and long-term query lengths),
run and backpropagated, and compared at float32 tolerance with what the official step computed: losses (with the
retriever losses' positive and negative parts), the write passes, each pass's adapter and gradient mode, the memory
the target read, the long-term rows each read retrieved and their order, the retriever's scores and positives, the
memory after the step, the revisit cache after it, the recorded gradients and the gradient norm of every trainable
parameter, and which parameters got a gradient at all.

Where we deliberately differ (docs/official-differences.md, "Training-step parity"), the test checks our documented
rule instead and says so in the assertion:
- multi-chunk steps of stages 1-2: the official target read a random subset of the pool plus the new rows, and the
  update then dropped a *different* random subset. Our step is scripted to evict the rows the official target did not
  read, so its read is the official read (losses and gradients equal), and our pool after the step is that read memory;
- ages count rows written since (the official code shifts old rows by a per-layer amount, and rows dropped from the
  pool a second time); stage 3: evicted rows enter the long-term memory at once instead of a staging buffer.
A case of several steps continues from the official memory before each step when ours deliberately differs.
`pytest -s` prints the largest relative difference measured per case and quantity (so does the last test).
"""

from __future__ import annotations

import ast
import json
import math
import warnings
from dataclasses import dataclass, field, replace

import pytest
import torch

from mplus_lightning import MemoryState, MPlus
from mplus_lightning.config import StepConfig
from mplus_lightning.data.sample import Sample
from mplus_lightning.model.adapters import OFFICIAL_NAMES
from mplus_lightning.model.formats import official_to_ours
from mplus_lightning.model.memory import LongTermMemory
from mplus_lightning.model.retriever import retriever_bce_loss
from mplus_lightning.stages.step import MemoryStep, RevisitCache, ScriptedDecisions, StepResult

from .official_train import (
    SITE,
    TRAIN_PREFIX,
    Case,
    OfficialStep,
    case_dirs,
    compose,
    fixtures_present,
    missing_fixtures_message,
    plan_evictions,
    rel_diff,
    replay,
)

TOLERANCE = 1e-5
"""Relative to the largest magnitude of the official tensor (fp32 on both sides)."""
CASES = case_dirs()
MEASURED: dict[str, dict[str, float]] = {}
"""case -> quantity -> largest relative difference (printed by the last test)."""


def _case_params():
    params = [pytest.param(path, id=path.name) for path in CASES]
    if not fixtures_present():   # extra cases do not replace the project's own
        params.insert(0, pytest.param(None, id="official-train-fixtures-missing"))
    return params


# ---- configuration ---------------------------------------------------------------------------------------------------
def step_config(p: dict) -> StepConfig:
    """Our StepConfig for the official model.params `p` (official names in StepConfig's docstrings)."""
    for key, supported in (("bce_loss_weight", 1), ("selector_loss_type", "bce"), ("instruct", "Repeat:")):
        if key in p and p[key] != supported:
            raise AssertionError(f"official {key}={p[key]!r}: the parity test knows only {supported!r}")
    schedule = p["num_contexts_schedule"]
    starts = [0] + list(schedule["checkpoints"])
    ltm = int(p.get("num_ltm_blocks", 0)) > 0
    return StepConfig(
        full_context_ratio=p["full_context_and_sentence_training_ratio"],
        multi_chunk_ratio=p["occassionally_cat_to_maximum_memory_ratio"],
        num_contexts_schedule=[[s, v] for s, v in zip(starts, schedule["values"])],
        revisit=bool(p["cache_data_for_longer_context"]),
        pass_ratio=p["pass_ratio"],
        empty_prob=p["empty_prob"],
        # One-chunk multi-chunk steps keep the write's gradient in stages 1-2 only (stage 3 writes under no_grad).
        single_chunk_gradient=not ltm,
        mask_extra_tokens=p["num_of_additional_tokens_to_mask"],
        max_seq_length=p["max_seq_length"],
        retriever_loss=bool(p.get("add_selector", False)),
        encoder_retriever_loss=bool(p.get("add_encoder_retriever", False)),
        negative_loss_weight=float(p.get("negative_loss_weight", 1.0)),
        random_retriever_length=bool(p.get("random_retriever_length", False)),
    )


# ---- running one case ------------------------------------------------------------------------------------------------
@dataclass
class Pass:
    """One write or read pass of our step, as the official record describes its `inner_forwards`."""

    is_injection: bool
    input_len: int
    grad_enabled: bool
    adapters: set[str] = field(default_factory=set)
    """Our adapter names the decoder layers ran with."""
    retrieved: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> the long-term rows a read retrieved [m, d], in the order it placed them (copied)."""


@dataclass
class StepRun:
    """One official step and what our step did with the same decisions."""

    index: int
    official: OfficialStep
    record: dict
    tensors: dict[str, torch.Tensor]
    before: MemoryState
    keep_old: list[list[int]] | None
    """Old rows our commits keep (per layer, ranks before the step)."""
    follows_official_update: bool
    """Whether our rule leaves the pool the official update left (else: the memory the target read)."""
    continued_from_official: bool = False
    """Our memory before this step was set to the official one (our previous step deliberately differed)."""
    result: StepResult | None = None
    after: MemoryState | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    deltas: list[torch.Tensor] = field(default_factory=list)
    reads: list[tuple] = field(default_factory=list)
    """(rows, positions, probe) of every read pass of the step (rows in slot order, copied)."""
    passes: list[Pass] = field(default_factory=list)
    """Every write and read pass, in call order."""
    doc: int = -1
    """The document number our step gave this sample (what its rows are stamped with)."""
    cache: RevisitCache | None = None
    """Our revisit cache after the step (a shallow copy)."""
    row_stamps: torch.Tensor | None = None
    """[L, N] which document wrote each slot, after the step."""


@dataclass
class Run:
    case: Case
    model: MPlus
    steps: list[StepRun] = field(default_factory=list)

    def quantity(self, s: StepRun, name: str) -> str:
        return name if len(self.steps) == 1 else f"step {s.index}: {name}"

    def check(self, s: StepRun, name: str, actual, expected, note: str = "") -> None:
        """Record the relative difference and assert it is within TOLERANCE."""
        diff = rel_diff(torch.as_tensor(actual), torch.as_tensor(expected))
        MEASURED.setdefault(self.case.name, {})[self.quantity(s, name)] = diff
        assert diff <= TOLERANCE, f"{self.case.name} step {s.index}: {name} differs from the official by {diff:.2e} " \
                                  f"(relative){note}"


def scripted_decisions(official: OfficialStep, plan: list[torch.Tensor]) -> ScriptedDecisions:
    f = official.flags
    script: dict[str, list] = {"full_context": [f["full_context"]]}
    if not f["full_context"]:
        script["multi_chunk"] = [f["multi_chunk"]]
    if "revisit" in f:
        script["revisit"] = [f["revisit"]]
    if "replace_cache" in f:
        script["replace_cache"] = [f["replace_cache"]]
    if official.kind == "multi":
        script["num_chunks"] = [official.num_chunks]
    script["evictions"] = plan
    if official.query_lengths is not None:
        script["query_lengths"] = [official.query_lengths]
    if official.ltm_query_lengths is not None:
        script["ltm_query_lengths"] = [official.ltm_query_lengths]
    return ScriptedDecisions(**script)


def _continue_from_official(memory: MemoryState, official_before: torch.Tensor) -> bool:
    """Put the official pool into our memory (rank by rank) if ours differs; whether it did."""
    if rel_diff(memory.ordered_rows(), official_before) <= TOLERANCE:
        return False
    slots = memory.slots_in_rank_order()
    memory.rows.scatter_(1, slots[..., None].expand_as(memory.rows), official_before.to(memory.rows.dtype))
    return True


def run_case(case: Case) -> Run:
    release = case.path / "release"
    model = MPlus.from_pretrained(release).train()
    memory = MemoryState.from_pretrained(release)
    L, N, K = memory.num_layers, memory.size, memory.num_tokens
    step = MemoryStep(model, step_config(case.params), memory)
    run = Run(case, model)
    write_pass, lm_loss = model.write_pass, model.lm_loss
    current: list[StepRun] = []
    active: list[Pass] = []

    def recording_write(ids, previous):
        p = Pass(True, ids.shape[1], torch.is_grad_enabled())
        current[-1].passes.append(p)
        active.append(p)
        try:
            delta = write_pass(ids, previous)
        finally:
            active.pop()
        current[-1].deltas.append(delta.detach().clone())
        return delta

    def recording_read(ids, loss_mask, view, probe=None, **kwargs):
        current[-1].reads.append((view.rows.detach().clone(), view.positions.clone(), probe))
        p = Pass(False, ids.shape[1], torch.is_grad_enabled())
        current[-1].passes.append(p)
        ltm = view.ltm
        if ltm is not None:   # which long-term rows each layer's read picks, in the order the read places them
            def retrieve(layer, queries, k):
                idx = LongTermMemory.retrieve(ltm, layer, queries, k)
                assert layer not in p.retrieved and idx.shape[0] == 1
                p.retrieved[layer] = ltm.view(layer)[0][idx[0]].detach().clone()
                return idx
            ltm.retrieve = retrieve
        active.append(p)
        try:
            return lm_loss(ids, loss_mask, view, probe=probe, **kwargs)
        finally:
            active.pop()
            if ltm is not None:
                del ltm.retrieve

    def record_adapter(_layer, _args, kwargs):
        if active:
            active[-1].adapters.add(kwargs.get("adapter"))

    hooks = [layer.register_forward_pre_hook(record_adapter, with_kwargs=True) for layer in model.layers]
    model.write_pass, model.lm_loss = recording_write, recording_read
    try:
        for index, record in enumerate(case.record["steps"]):
            tensors = case.tensors(index)
            batch = record["batch"]
            if batch["label"] != 1:
                raise AssertionError(f"{case.name}: label {batch['label']} (the repeat task needs the official "
                                     "tokenizer, which the fixtures do not carry)")
            continued = index > 0 and _continue_from_official(memory, tensors["before/memory"])
            official = replay(case, record, L, N)
            # Our commits keep the rows the official target read: the official update's rows after a single-chunk
            # step and in stage 3 (it updates the pool before the read), the read subset in stages 1-2.
            keep_old = official.read_old if official.kind == "multi" else official.after_old
            plan = (plan_evictions(N, K, official.num_chunks, keep_old, official.new_rows)
                    if official.kind in ("multi", "single") else [])
            s = StepRun(index, official, record, tensors, memory.clone(), keep_old,
                        follows_official_update=keep_old == official.after_old, continued_from_official=continued)
            current.append(s)
            step.decisions = decisions = scripted_decisions(official, plan)
            contexts = [tensors[f"context_ids.{i}"][0] for i in range(len(batch["context_lengths"]))]
            sample = Sample(contexts=contexts, target=tensors["target_ids"][0], doc_id=f"{case.name}:{index}")
            model.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # chunks shorter than the official minimum of 16 tokens
                s.result = step.step(sample, global_step=case.record.get("trainer_global_step", 0))
            s.result.loss.backward()
            decisions.assert_consumed()
            s.grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
            s.after = memory.clone()
            s.doc, s.cache, s.row_stamps = step.docs_seen - 1, replace(step.revisit), step.row_stamps.clone()
            run.steps.append(s)
    finally:
        del model.write_pass, model.lm_loss
        for hook in hooks:
            hook.remove()
    return run


@pytest.fixture(scope="module", params=_case_params())
def run(request) -> Run:
    if request.param is None:
        pytest.fail(missing_fixtures_message())
    return run_case(Case.load(request.param))


def by_rank(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[L, m, ...] per-slot values put in rank order (by their RoPE positions)."""
    order = torch.argsort(positions, dim=1)
    return torch.gather(values, 1, order.view(*order.shape, *[1] * (values.dim() - 2)).expand_as(values))


def our_age(s: StepRun, origin, layer: int) -> int:
    """The age our rule gives after the step to a row named as in OfficialStep (plus ("ltm", i): long-term row i):
    rows written since it was written, i.e. K per commit for rows that existed before the step."""
    K, n = s.before.num_tokens, s.official.num_chunks
    if isinstance(origin, tuple) and origin[0] == "ltm":
        return int(s.before.ltm.view(layer)[2][origin[1]]) + K * n
    if isinstance(origin, tuple):
        chunk, row = origin
        return K - 1 - row + K * (n - 1 - chunk)
    return int(s.before.ages[layer, s.before.slots_in_rank_order()[layer, origin]]) + K * n


# ---- the tests -------------------------------------------------------------------------------------------------------
def test_memory_before_each_step_is_the_official_one(run):
    for s in run.steps:
        run.check(s, "memory before", s.before.ordered_rows(), s.tensors["before/memory"])
        for l in range(s.before.num_layers):
            ages = s.tensors.get(f"before/memory_ages.{l}")
            if ages is not None and s.index == 0:  # a loaded pool's ages are rank-derived, as the fixture set them
                assert s.before.ages[l, s.before.slots_in_rank_order()[l]].tolist() == ages.long().tolist()


def test_step_kind_and_write_passes(run):
    for s in run.steps:
        o = s.official
        assert s.result.kind == o.kind, f"step {s.index}: our step ran a {s.result.kind} step, official {o.kind}"
        assert len(s.deltas) == o.num_chunks
        for i, delta in enumerate(s.deltas):
            run.check(s, f"write {i}", delta, s.tensors[f"forward.{i}/delta_memory"])


def _official_adapters(forward: dict) -> set[str]:
    """Our adapter names behind an official inner forward's `adapter` (the active adapters, each a printed list)."""
    return {OFFICIAL_NAMES[name] for printed in forward["adapter"] for name in ast.literal_eval(printed)}


def test_passes_adapters_and_gradient_mode(run):
    """Each official write and read (`inner_forwards`) against ours, in order: kind, input length, adapter, and whether
    it ran with gradient."""
    for s in run.steps:
        official = s.record["inner_forwards"]
        assert [(p.is_injection, p.input_len) for p in s.passes] == \
            [(f["is_injection"], f["input_len"]) for f in official], f"step {s.index}: passes differ"
        # The positional vector e enters only write passes, so its gradient says whether an official write kept one.
        write_kept_gradient = s.record["grad_norms"][TRAIN_PREFIX + "new_memory_positional_emb"] is not None
        for i, (ours, theirs) in enumerate(zip(s.passes, official)):
            assert ours.adapters == _official_adapters(theirs), \
                f"step {s.index}, pass {i}: our layers ran with {ours.adapters}, official {theirs['adapter']}"
            # Deliberate: stage 2 writes ran with gradient officially but were detached; ours run without one.
            expected = theirs["grad_enabled"] and (write_kept_gradient or not theirs["is_injection"])
            assert ours.grad_enabled == expected, \
                f"step {s.index}, pass {i}: ours ran with grad_enabled={ours.grad_enabled}, expected {expected} " \
                f"(official grad_enabled={theirs['grad_enabled']}, a write kept its gradient: {write_kept_gradient})"


def test_memory_the_target_read(run):
    """The rows the target read: the new block alone (single-chunk), else the official read of the pool; and the
    retriever's scores of those rows."""
    for s in run.steps:
        o, t = s.official, s.tensors
        (rows, positions, probe), = s.reads
        if o.kind == "single":
            run.check(s, "memory read", rows, t["forward.0/delta_memory"])
            continue
        if o.kind == "multi" and o.read_old is not None:
            deltas = [t[f"forward.{i}/delta_memory"] for i in range(o.num_chunks)]
            expected = compose(t["before/memory"], deltas, o.read_old, o.new_rows)
        else:   # full-context and revisit steps read the pool as it was
            expected = t["before/memory"]
        run.check(s, "memory read", by_rank(rows, positions), expected)
        for name, scores in (("retriever_weights", probe and probe.scores),
                             ("encoder_retriever_weights", probe and probe.encoder_scores)):
            key = f"forward.{o.num_chunks}/{name}"
            if key in t:
                assert scores, f"step {s.index}: the official step computed {name}, ours did not"
                run.check(s, name.replace("_", " "), by_rank(torch.stack(scores).detach(), positions), t[key])
            else:
                assert not scores, f"step {s.index}: ours computed {name}, the official step did not"


def test_losses(run):
    for s in run.steps:
        r, rec = s.result, s.record
        run.check(s, "lm loss", r.lm_loss.detach(), torch.tensor(rec["lm_loss"]))
        run.check(s, "total loss", r.loss.detach(), torch.tensor(rec["loss_total"]))
        for ours, theirs in (("retriever_loss", "selector/loss"), ("retriever_encoder_loss", "selector/encoder_loss")):
            if theirs in rec["logged"]:
                assert ours in r.metrics, f"step {s.index}: the official step has {theirs}, ours no {ours}"
                run.check(s, theirs, torch.tensor(r.metrics[ours]), torch.tensor(rec["logged"][theirs]))
            else:
                assert ours not in r.metrics


def test_retriever_loss_parts(run):
    """The positive and negative parts of each class-balanced BCE the official step logged, from our probe's scores and
    labels; and our loss weighs them as (positive + lambda negative) / (1 + lambda), which lambda = 1 alone cannot
    tell from a swapped weighting."""
    for s in run.steps:
        logged, positives = s.record["logged"], s.result.positives
        probes = [probe for _, _, probe in s.reads if probe is not None]
        for prefix, scores_of in (("selector/", lambda p: p.scores), ("selector/encoder_", lambda p: p.encoder_scores)):
            if f"{prefix}positive_loss" not in logged:
                assert not any(scores_of(p) for p in probes), f"step {s.index}: ours scored {prefix}, official did not"
                continue
            (probe,) = probes
            w = torch.stack(scores_of(probe)).detach()                         # [L, N] in slot order, as positives
            pos, neg = logged[f"{prefix}positive_loss"], logged[f"{prefix}negative_loss"]
            # -log(w + 1e-5) and -log(1 - w + 1e-5), as the official parts (retriever_bce_loss's eps)
            run.check(s, f"{prefix}positive_loss", -torch.log(w[positives] + 1e-5).mean(), torch.tensor(pos))
            run.check(s, f"{prefix}negative_loss", -torch.log(1 - w[~positives] + 1e-5).mean(), torch.tensor(neg))
            for weight in (0.0, 3.0):
                run.check(s, f"{prefix}loss at negative weight {weight}", retriever_bce_loss(w, positives, weight),
                          torch.tensor((pos + weight * neg) / (1 + weight)))


def test_retriever_positives(run):
    """The retriever's positives are the rows this step wrote (official `cached_contexts_indicators`)."""
    for s in run.steps:
        indicators = s.record["cache_state_after"].get("cached_contexts_indicators")
        if indicators is None:   # no retriever in this stage: nothing may train on the positives
            assert "retriever_loss" not in s.result.metrics
            continue
        assert s.result.positives is not None, f"step {s.index}: the official step labelled rows, ours did not"
        ours = torch.gather(s.result.positives, 1, s.after.slots_in_rank_order()).float()
        assert ours.tolist() == indicators


def test_revisit_cache_after_step(run):
    """The official `cache_state_after`: whether the last step was a revisit (`last_indicator`), chunks injected since
    the cached target (`nuc_length`), whether it is this step's target, and its retriever labels for a later revisit
    (`cached_contexts_indicators`: the rows its sample wrote, which our row stamps follow)."""
    kept_after_revisit = 0   # chunks of steps that kept the cache after a revisit since it was set
    for s in run.steps:
        official, c = s.record["cache_state_after"], s.cache
        this_target = c.doc == s.doc
        assert this_target == official["cached_sentence_is_this_target"], \
            f"step {s.index}: our cache holds document {c.doc}, this step's is {s.doc}"
        if this_target:
            assert c.ids[0].tolist() == s.tensors["target_ids"][0].tolist(), f"step {s.index}: cached target ids"
            kept_after_revisit = 0
        elif s.official.flags.get("replace_cache") is False:
            kept_after_revisit += s.official.num_chunks
        assert int(c.last_step_was_revisit) == official["last_indicator"], f"step {s.index}: last_indicator"
        # Deliberate: our counter also counts the chunks of steps that keep the cache after a revisit.
        assert c.chunks_since - kept_after_revisit == official["nuc_length"], \
            f"step {s.index}: {c.chunks_since} chunks since the cached target ({kept_after_revisit} of them from " \
            f"steps that kept it after a revisit), official nuc_length {official['nuc_length']}"
        indicators = official.get("cached_contexts_indicators")
        if indicators is not None:
            carried = torch.gather(s.row_stamps == c.doc, 1, s.after.slots_in_rank_order()).float()
            assert carried.tolist() == indicators, f"step {s.index}: the labels a later revisit would use differ"


def test_memory_after_step(run):
    for s in run.steps:
        o, after = s.official, s.after.ordered_rows()
        if o.kind in ("full", "revisit"):
            run.check(s, "memory after", after, s.tensors["before/memory"])
        elif s.follows_official_update:
            run.check(s, "memory after", after, s.tensors["after/memory"])
        else:
            # Deliberate: the official update drops a random subset independent of the one its target read.
            deltas = [s.tensors[f"forward.{i}/delta_memory"] for i in range(o.num_chunks)]
            read = compose(s.tensors["before/memory"], deltas, s.keep_old, o.new_rows)
            run.check(s, "memory after (= memory read)", after, read,
                      " [deliberate difference: our pool after a multi-chunk step is the memory its target read]")
            assert rel_diff(after, s.tensors["after/memory"]) > TOLERANCE, \
                "the official update kept the rows its target read: this case cannot show the difference"


def test_short_term_ages_after_step(run):
    """Ages count rows written since; the official ages agree for the new rows. (For the old rows the official code
    adds one plus the oldest new row's age in that layer instead: a per-layer amount.)"""
    for s in run.steps:
        o = s.official
        if o.kind not in ("multi", "single"):
            assert torch.equal(s.after.ages, s.before.ages)
            continue
        for l in range(s.after.num_layers):
            ours = s.after.ages[l, s.after.slots_in_rank_order()[l]].tolist()
            expected = [our_age(s, origin, l) for origin in list(s.keep_old[l]) + list(o.new_rows[l])]
            assert ours == expected, f"step {s.index}, layer {l}: short-term ages {ours}, our rule says {expected}"
            official = s.tensors.get(f"after/memory_ages.{l}")
            if official is not None:
                new = len(o.new_rows[l])
                assert ours[-new:] == official.long().tolist()[-new:], f"layer {l}: ages of the new rows"


def test_long_term_memory_after_step(run):
    """Stage 3: the official long-term rows plus its staging buffer, with the same keys; ages by our rule."""
    for s in run.steps:
        t, ltm, o = s.tensors, s.after.ltm, s.official
        if not run.case.has_ltm:
            assert ltm is None
            continue
        for l in range(s.after.num_layers):
            rows, keys, ages = (x.detach() for x in ltm.view(l))
            official_rows = torch.cat([t[f"after/ltm.{l}"], t["after/staged_rows"][l]])
            official_keys = torch.cat([t[f"after/ltm_keys.{l}"], t["after/staged_keys"][l]])
            official_ages = torch.cat([t[f"after/ltm_ages.{l}"], t["after/staged_ages"][l]]).long().tolist()
            n_ltm = t[f"after/ltm.{l}"].shape[0]
            origins = [("ltm", i) for i in range(n_ltm)] + list(o.dropped_old[l]) + list(o.dropped_delta[l])
            assert rows.shape[0] == official_rows.shape[0] == len(origins), \
                f"layer {l}: {rows.shape[0]} long-term rows, official {official_rows.shape[0]} (long-term + staged)"
            # Match rows by content: our long-term memory holds the official one and its staging buffer in another
            # order (evicted rows enter it at the commit that evicts them).
            match = torch.cdist(official_rows.double(), rows.double()).argmin(dim=1)
            assert sorted(match.tolist()) == list(range(rows.shape[0])), f"layer {l}: long-term rows differ"
            run.check(s, f"ltm rows layer {l}", rows[match], official_rows)
            run.check(s, f"ltm keys layer {l}", keys[match], official_keys)
            expected = [our_age(s, origin, l) for origin in origins]
            assert ages[match].tolist() == expected, f"layer {l}: long-term ages differ from our rule"
            for origin, ours, theirs in zip(origins, expected, official_ages):
                if isinstance(origin, int):
                    # Deliberate: the official code ages rows dropped from the pool a second time.
                    assert theirs > ours, f"layer {l}: pool row {origin} has official age {theirs}, ours {ours}"
                else:
                    assert theirs == ours, f"layer {l}: {origin} has official age {theirs}, ours {ours}"


def test_long_term_rows_each_read_retrieved(run):
    """Stage 3: per layer, the long-term rows each read retrieved (`ltm_indices_returned`, recorded in index order) are
    ours, placed oldest first; with the staged rows, the official top-k (logged at get_ltm) is the set we read."""
    for s in run.steps:
        t = s.tensors
        reads = [p for p in s.passes if not p.is_injection]
        official = [f for f in s.record["inner_forwards"] if not f["is_injection"]]
        topk = [d["result"] for d in s.record["random_decisions"] if d["site"].endswith(SITE["ltm_topk"])]
        assert len(topk) == sum(len(f.get("ltm_indices_returned") or []) for f in official), "one top-k per layer"
        for i, (ours, theirs) in enumerate(zip(reads, official)):
            returned = theirs.get("ltm_indices_returned")
            if returned is None:
                assert not ours.retrieved, f"step {s.index}, read {i}: ours retrieved long-term rows, official not"
                continue
            assert sorted(ours.retrieved) == list(range(len(returned)))
            layer_topk, topk = topk[: len(returned)], topk[len(returned):]
            for l, indices in enumerate(returned):
                # The official rows a read could pick: the long-term rows, then the staging buffer (both as after the
                # step: the official stage 3 updates the pool before its read and nothing after).
                candidates = torch.cat([t[f"after/ltm.{l}"], t["after/staged_rows"][l]])
                rows = ours.retrieved[l]
                match = torch.cdist(rows.double(), candidates.double()).argmin(dim=1)
                run.check(s, f"ltm rows retrieved layer {l}", rows, candidates[match])
                picked = match.tolist()
                assert len(set(picked)) == len(picked), f"layer {l}: a long-term row retrieved twice: {picked}"
                assert sorted(picked) == sorted(layer_topk[l]), \
                    f"step {s.index}, layer {l}: we read rows {sorted(picked)}, the official top-k " \
                    f"{sorted(layer_topk[l])} (long-term rows, then staged ones)"
                ages = t[f"before/ltm_ages.{l}"].long().tolist()
                assert len({ages[j] for j in indices}) == len(indices), "the fixture's long-term ages are distinct"
                oldest_first = sorted(indices, key=lambda j: ages[j], reverse=True)
                n_ltm = t[f"after/ltm.{l}"].shape[0]
                ours_ltm = [j for j in picked if j < n_ltm]
                assert ours_ltm == oldest_first, \
                    f"step {s.index}, layer {l}: we placed long-term rows {ours_ltm}, official retrieved {indices} " \
                    f"(oldest first by the official ages: {oldest_first})"


def _ours(run: Run, official_name: str) -> list[str]:
    """Our parameters behind an official training parameter name (bos_embedding: one vector per layer for us)."""
    key = official_name.removeprefix(TRAIN_PREFIX)
    if key == "bos_embedding":
        return [f"llama.model.layers.{l}.memory_bos" for l in range(run.model.config.num_layers)]
    if key == "new_memory_positional_emb":
        return ["new_memory_embedding"]
    return [official_to_ours(key)]


def _official_shaped(run: Run, grads: dict, official_name: str) -> torch.Tensor | None:
    """Our gradient behind an official parameter, in its shape (None: no gradient)."""
    ours = [grads[n] for n in _ours(run, official_name)]
    if all(g is None for g in ours):
        return None
    if len(ours) > 1:     # bos_embedding [L, 1, d]
        return torch.stack([g if g is not None else torch.zeros_like(run.model.new_memory_embedding)
                            for g in ours])[:, None]
    key = official_name.removeprefix(TRAIN_PREFIX)
    return ours[0].reshape(1, 1, -1) if key == "new_memory_positional_emb" else ours[0]


def test_trainable_parameters_are_the_official_ones(run):
    ours = {n for n, p in run.model.named_parameters() if p.requires_grad}
    theirs = {n for name in run.steps[0].record["grad_norms"] for n in _ours(run, name)}
    assert ours == theirs, f"only ours: {sorted(ours - theirs)[:5]}; only official: {sorted(theirs - ours)[:5]}"


def test_same_parameters_get_gradients(run):
    for s in run.steps:
        names = s.record["grad_norms"]
        ours_without = sorted(n for n in names if _official_shaped(run, s.grads, n) is None)
        theirs_without = sorted(n for n, v in names.items() if v is None)
        assert ours_without == theirs_without, (
            f"step {s.index} ({s.official.kind}): no gradient only in ours: "
            f"{sorted(set(ours_without) - set(theirs_without))[:6]}; only officially: "
            f"{sorted(set(theirs_without) - set(ours_without))[:6]}")
        assert theirs_without == sorted(s.record["trainable_params_without_grad"])


def test_gradients(run):
    for s in run.steps:
        for key, expected in s.tensors.items():
            if key.startswith("grad/"):
                name = key.removeprefix("grad/")
                grad = _official_shaped(run, s.grads, name)
                assert grad is not None, f"step {s.index}: {name} has no gradient in ours"
                run.check(s, f"grad {name.removeprefix(TRAIN_PREFIX)}", grad, expected)
        worst, worst_name = 0.0, ""
        for name, norm in s.record["grad_norms"].items():
            grad = _official_shaped(run, s.grads, name)
            if norm is None or grad is None:
                continue
            diff = abs(grad.norm().item() - norm) / max(norm, 1e-30)
            if diff > worst:
                worst, worst_name = diff, name
        MEASURED.setdefault(run.case.name, {})[run.quantity(s, "grad norms (worst)")] = worst
        assert worst <= TOLERANCE, f"step {s.index}: gradient norm of {worst_name} differs by {worst:.2e} (relative)"


def test_zz_report(tmp_path_factory, capsys):
    """Prints (and saves as JSON) the largest relative differences measured above, per case and quantity."""
    assert MEASURED, "no case ran"
    out = tmp_path_factory.mktemp("train_parity") / "measured.json"
    out.write_text(json.dumps(MEASURED, indent=2))
    lines = [f"largest relative differences to the official training step (all of them: {out}):"]
    for case, values in MEASURED.items():
        groups: dict[str, float] = {}
        for quantity, diff in values.items():
            group = "gradients" if "grad" in quantity else "ltm" if "ltm" in quantity else quantity
            groups[group] = max(groups.get(group, 0.0), diff)
        lines.append(f"  {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in groups.items()))
        assert all(math.isfinite(v) for v in values.values())
    with capsys.disabled():
        print("\n" + "\n".join(lines))
