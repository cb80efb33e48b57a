"""Profiler regions: labelled in the model code, visible to torch.profiler, CPU-timed on request, and the benchmark's
hooks for transformers' modules leave nothing behind."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from mplus_lightning import bench
from mplus_lightning.model import profiling

from .conftest import random_ids

MODEL_REGIONS = {"memory_kv", "read_prefix", "retrieval.scores", "retrieval.select", "lm_head",
                 "newest_block", "commit", "commit.ltm_keys", "commit.ltm_add", "commit.sample_evictions"}


def work(model, memory):
    for seed in range(6):   # the pool overflows into the long-term memory, so reads retrieve
        model.inject(memory, random_ids(20, seed=seed), generator=torch.Generator().manual_seed(seed))
    model.read(memory, random_ids(8, seed=9))


def test_the_model_code_labels_its_regions_for_the_profiler(tiny_model):
    memory = tiny_model.new_memory(seed=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work(tiny_model, memory)
    labels = {e.key for e in prof.key_averages()}
    assert MODEL_REGIONS <= labels, f"missing: {sorted(MODEL_REGIONS - labels)}"
    assert memory.ltm.size > 0


def test_thread_cpu_times_are_collected_only_inside(tiny_model):
    memory = tiny_model.new_memory(seed=0)
    with profiling.thread_cpu_times() as table:
        assert profiling.collecting_thread_cpu_times()
        work(tiny_model, memory)
    assert MODEL_REGIONS <= set(table) and all(ms >= 0 for ms in table.values())
    assert table["commit"] >= table["commit.ltm_keys"]          # inclusive of the regions nested in it
    assert not profiling.collecting_thread_cpu_times()
    before = dict(table)
    work(tiny_model, memory)
    assert table == before


def test_bench_hooks_label_attention_and_mlp_and_are_removed(tiny_model):
    memory = tiny_model.new_memory(seed=0)
    cpu_ms: dict[str, float] = {}
    with bench.labelled_regions(tiny_model, cpu_ms), profile(activities=[ProfilerActivity.CPU]) as prof:
        work(tiny_model, memory)
    labels = {e.key for e in prof.key_averages()}
    assert {"attention", "mlp"} <= labels and {"attention", "mlp"} <= set(cpu_ms)
    for layer in tiny_model.layers:
        assert not layer.self_attn._forward_hooks and not layer.self_attn._forward_pre_hooks
        assert not layer.mlp._forward_hooks and not layer.mlp._forward_pre_hooks
    assert set(bench.REGIONS) == MODEL_REGIONS | set(bench.HOOKED_REGIONS)
