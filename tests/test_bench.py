"""The inference benchmark runs end to end at the tiny shape and reports sane numbers (no timing thresholds)."""
import json
import math
import os

import pytest
import torch

from mplus_lightning import bench


@pytest.fixture
def keep_threads():
    """The benchmark calls torch.set_num_threads; give the rest of the session its thread count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _positive_finite(x, where):
    assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, f"{where} = {x!r}"


def _timings(t, where):
    for key in ("median", "min", "max"):
        _positive_finite(t[key], f"{where}.{key}")
    assert t["n"] == len(t["samples"]) >= 1
    assert t["min"] <= t["median"] <= t["max"]


@pytest.mark.slow
def test_inference_tiny_end_to_end(tmp_path, keep_threads, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["inference", "--shape", "tiny", "--threads", "1", "--repeats", "2", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed == json.loads(json.dumps(result))

    shape, settings = printed["shape"], printed["settings"]
    assert shape["name"] == "tiny" and shape["K"] == 16 and shape["N"] == 64 and shape["K0"] == 32
    assert settings["threads"] == 1 and settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert settings["torch"] == torch.__version__

    model = printed["model"]
    for op in ("inject", "read_after_inject", "read_prefill_last_logit", "read_prefill_full_logits", "generate"):
        _timings(model[f"{op}_s"], op)
        assert model[f"{op}_s"]["n"] == 2
    for key in ("inject_tokens_per_s", "prefill_tokens_per_s", "decode_s_per_token_est"):
        _positive_finite(model[key], key)
    assert model["prefix_rows_per_layer"] == 1 + 32 + 64

    stream = printed["stream"]
    assert stream["injections"] == 20
    _positive_finite(stream["total_s"], "stream.total_s")
    for key, value in stream["per_injection_s"].items():
        _positive_finite(value, f"stream.per_injection_s.{key}")
    before, after = stream["ltm_rows_per_layer"]
    assert after - before == 20 * 16, "every injection moves K rows per layer to the long-term memory"

    retrieval = printed["retrieval"]
    cases = retrieval["cases"]
    assert [c["rows"] for c in cases] == [4_000, 40_000, 400_000]
    for c in cases:
        for key in ("retrieval_s", "gemm_s"):
            _timings(c[key], f"{c['rows']}.{key}")
        for key in ("ratio_retrieval_over_gemm", "key_scan_GBps", "gemm_GFLOPs", "ltm_store_bytes", "peak_rss_bytes"):
            _positive_finite(c[key], f"{c['rows']}.{key}")
        # one row: d fp32 values + s fp32 key + an int64 age
        assert c["ltm_store_bytes"] == c["rows"] * (64 * 4 + 16 * 4 + 8)
        assert c["retrieval_transient_bytes"] >= 0
    # Memory is linear in rows: 10x the rows is 10x the store ...
    for small, big in zip(cases, cases[1:]):
        assert big["ltm_store_bytes"] / small["ltm_store_bytes"] == pytest.approx(big["rows"] / small["rows"], rel=0.01)
    # ... and a retrieval never needs the [n, M] score matrix: its scratch stays far below it at the largest store.
    largest = cases[-1]
    assert largest["retrieval_transient_bytes"] < largest["score_matrix_bytes_if_materialised"] / 4

    memory = printed["memory"]
    _positive_finite(memory["peak_rss_bytes"], "peak_rss_bytes")
    assert memory["ltm_bytes_after_setup"]["rows_per_layer"] == 1000
    _positive_finite(printed["wall_s"], "wall_s")


def test_8b_refuses_cpu(capsys):
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(["inference", "--shape", "8b", "--device", "cpu"])


def test_shapes_match_the_brief():
    mid = bench.SHAPES["mid"]
    cfg = mid.config(ltm_capacity=mid.ltm_rows + 1000)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_tokens, cfg.stm_rows, cfg.ltm_read_rows) == (8, 256, 64, 2048, 512)
    assert (cfg.num_blocks, cfg.num_ltm_blocks, cfg.selector_hidden_dim, cfg.lora_r) == (40, 8, 64, 8)
    big = bench.SHAPES["8b"].config(ltm_capacity=30_000)
    assert (big.num_layers, big.hidden_size, big.stm_rows, big.ltm_read_rows, big.selector_hidden_dim) == \
        (32, 4096, 10_240, 2_560, 256)
    assert big.llama["intermediate_size"] == 14336 and big.llama["vocab_size"] == 128256


def test_bfloat16_build_path_and_profile(keep_threads):
    """The 8b shape is built under torch.device + a bf16 default dtype; run that path at the tiny shape (CPU)."""
    tiny = bench.SHAPES["tiny"]
    result = bench.run_inference(tiny, torch.device("cpu"), torch.bfloat16, threads=1, repeats=1, include=("model",))
    assert result["settings"]["dtype"] == "bfloat16"
    _timings(result["model"]["generate_s"], "generate")
    prof = bench.run_profile(tiny, torch.device("cpu"), torch.float32, threads=1, phases=("inject", "prefill"),
                             calls=1, top=5)
    regions = prof["phases"]["prefill"]["regions"]
    assert regions["memory_kv"]["calls"] == tiny.layers and "retrieval.scores" in regions
    assert prof["phases"]["inject"]["top_ops_by_self_time"]
    assert regions["attention"]["calls"] == tiny.layers and regions["retrieval.scores"]["inside"] == "read_prefix"
    # nothing stays switched on afterwards (the model code is never patched: its regions are labelled in place)
    from mplus_lightning.model import profiling
    assert not profiling.collecting_thread_cpu_times()


def test_region_times_keep_the_cpu_range_of_a_region():
    # Under CUDA the profiler lists a region twice: its CPU range and a device-side annotation with no CPU time,
    # which used to overwrite it (every region read 0 ms in the H100 profile).
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    events = [E(key="attention", device_type=DeviceType.CPU, cpu_time_total=5000.0, count=4),
              E(key="attention", device_type=DeviceType.CUDA, cpu_time_total=0.0, count=4),
              E(key="aten::mm", device_type=DeviceType.CPU, cpu_time_total=9000.0, count=8)]
    regions = bench.region_times(events, calls=2, thread_cpu_ms={"attention": 3.0})
    assert regions == {"attention": {"ms_per_call": 2.5, "calls": 2, "thread_cpu_ms_per_call": 1.5, "inside": None}}


def test_training_benchmark_reports_every_step_kind_and_the_plain_step(tmp_path, capsys):
    from mplus_lightning.bench import main

    out = tmp_path / "training.json"
    result = main(["training", "--shape", "tiny", "--threads", "1", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    # stdout is the JSON; stderr a line per kind with its verdict on the target
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads(json.dumps(result))
    assert "target (>= 0.8 vs plain)" in captured.err
    verdicts = {line.split()[0]: line.rsplit("  ", 1)[1] for line in captured.err.splitlines()
                if line.split() and line.split()[0] in result["kinds"]}
    assert set(verdicts) == set(result["kinds"])
    for name, kind in result["kinds"].items():
        met = kind["ratio_with_attention_to_plain_llama"] >= 0.8
        assert verdicts[name] == ("met" if met else "NOT met"), (name, kind["ratio_with_attention_to_plain_llama"])
    # a wait policy that taxes the M+ steps' many small ops is pointed out (make test runs with PASSIVE)
    from mplus_lightning.bench_training import summary
    passive = {**result, "threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}}
    assert "GOMP_SPINCOUNT=10000" in summary(passive)
    assert "GOMP_SPINCOUNT" not in summary({**passive, "env": {"GOMP_SPINCOUNT": "10000"}})
    assert "GOMP_SPINCOUNT" not in summary({**passive, "threads": 1})
    assert set(result["kinds"]) == {"full", "revisit", "multi", "multi_one_chunk", "single"}
    for kind in result["kinds"].values():
        assert kind["flops"] > 0 and kind["seconds"] > 0 and math.isfinite(kind["ratio_to_plain_llama"])
    # a multi-chunk step writes 4 chunks before reading: more tokens than a single-chunk step
    assert result["kinds"]["multi"]["tokens"] > result["kinds"]["single"]["tokens"]
    for kind in result["kinds"].values():
        # each kind beside a plain step of as many tokens, timed in alternation with it
        plain = kind["plain_llama"]
        assert plain["tokens"] == kind["tokens"] and plain["flops"] > 0
        assert len(plain["seconds_all"]) == len(kind["seconds_all"]) == 1
        assert kind["ratio_to_plain_llama"] == pytest.approx(kind["flops_per_s"] / plain["flops_per_s"])
        # the CPU attention kernels, which torch's counter leaves out, are counted beside it
        assert plain["attention_flops"] > 0
        assert kind["attention_flops"] > 0 and math.isfinite(kind["ratio_with_attention_to_plain_llama"])
        # and a Llama trained as M+ trains its backbone (frozen, LoRA): the same attention, fewer matmul FLOPs
        lora = kind["lora_llama"]
        assert lora["tokens"] == kind["tokens"] and lora["attention_flops"] == plain["attention_flops"]
        assert 0 < lora["flops"] < plain["flops"] and len(lora["seconds_all"]) == 1
        assert kind["ratio_with_attention_to_lora_llama"] == pytest.approx(
            kind["flops_per_s_with_attention"] / lora["flops_per_s_with_attention"])
    assert len(result["load_average_start"]) == 3 and result["cpu"]   # what the figures were measured on
    # the thread settings that move the ratios are recorded (make test runs with OMP_WAIT_POLICY=PASSIVE)
    assert result["env"].get("OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY")


def test_training_benchmark_counts_the_attention_a_query_sees():
    import torch.nn.functional as F

    from mplus_lightning.bench_training import _flops
    from mplus_lightning.model.attention import memory_attention

    n, prefix, dim, heads = 10, 20, 4, 8
    q = torch.randn(1, heads, n, dim, requires_grad=True)
    k = torch.randn(1, heads // 2, prefix + n, dim, requires_grad=True)
    visible = heads * (n * prefix + n * (n + 1) // 2)             # every prefix row, then causal over the tokens
    expected = (4 + 8) * dim * visible                            # forward + backward
    assert _flops(lambda: memory_attention(q, k, k).sum().backward()) == (0, expected)
    # the masked attention it replaced does the hidden scores too, but is credited the same work
    i, j = torch.arange(n)[:, None], torch.arange(prefix + n)[None]
    mask = torch.zeros(n, prefix + n).masked_fill_(j > i + prefix, torch.finfo(torch.float32).min)
    kk = k.repeat_interleave(2, dim=1)
    assert _flops(lambda: F.scaled_dot_product_attention(q, kk, kk, attn_mask=mask).sum().backward()) == (0, expected)


@pytest.mark.parametrize("env, hint", [({}, True), ({"GOMP_SPINCOUNT": "10000"}, False),
                                       ({"OMP_WAIT_POLICY": "PASSIVE"}, False)])
def test_busy_machine_warning_names_the_bounded_spin_when_threads_spin_unbounded(monkeypatch, env, hint):
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    busy = {"device": "cpu", "cpu_count": 2, "load_average_start": [1.5, 1.0, 1.0], "load_average_end": [3.0, 2, 1]}
    msg = bench.busy_machine_warning(busy, threads=2)
    assert msg is not None and "busy" in msg and "1.5" in msg
    assert ("GOMP_SPINCOUNT=10000" in msg) is hint
    assert "GOMP_SPINCOUNT" not in (bench.busy_machine_warning(busy, threads=1) or "")
    # our own threads raise the end figure: an idle machine is not reported busy
    idle = {**busy, "load_average_start": [0.2, 0.1, 0.1], "load_average_end": [2.1, 1, 1]}
    assert bench.busy_machine_warning(idle, threads=2) is None


def test_the_lora_llama_baseline_trains_what_m_plus_trains_of_its_backbone():
    from mplus_lightning.bench_training import _lora_llama, _module

    module = _module(bench.SHAPES["tiny"])
    llama = _lora_llama(module)
    config = module.model.config
    trainable = {n: p for n, p in llama.named_parameters() if p.requires_grad}
    # one adapter (A and B) on each target projection of each layer, nothing else
    assert len(trainable) == 2 * len(config.lora_targets) * config.num_layers
    assert all("lora_" in n and ".write." in n for n in trainable)
    assert {p.shape[0] for n, p in trainable.items() if "lora_A" in n} == {config.lora_r}
    q = llama.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "AddmmLoraLinear" and q.active_adapters == ["write"]
    assert q.scaling["write"] == module.model.layers[0].self_attn.q_proj.scaling["write"]


def test_profile_of_a_training_step_kind(keep_threads, capsys):
    from mplus_lightning.bench_training import KINDS

    assert tuple(bench.TRAINING_PHASES.values()) == KINDS   # every kind `bench training` times can be profiled
    tiny = bench.SHAPES["tiny"]
    prof = bench.run_profile(tiny, torch.device("cpu"), torch.float32, threads=1, phases=("train_single",),
                             calls=1, top=5)
    phase = prof["phases"]["train_single"]
    # a single-chunk step: a write pass, then a read of [bos ; the new block] with the same layers
    assert phase["regions"]["memory_kv"]["calls"] == 2 * tiny.layers
    assert phase["regions"]["attention"]["calls"] == 2 * tiny.layers
    assert phase["top_ops_by_self_time"] and phase["wall_ms_unprofiled_median"] > 0
    with pytest.raises(SystemExit):
        bench.main(["profile", "--shape", "tiny", "--phases", "train_singel"])
    assert "--phases: unknown ['train_singel']" in capsys.readouterr().err


def test_out_path_is_made_or_refused_before_the_run(tmp_path, capsys, keep_threads):
    out = tmp_path / "new" / "dir" / "training.json"
    bench.main(["training", "--shape", "tiny", "--threads", "1", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["shape"] == "tiny"
    capsys.readouterr()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for bad, says in ((blocker / "x.json", "a_file is a file"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit):
            bench.main(["training", "--shape", "tiny", "--out", str(bad)])
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and "kind " not in err   # refused before any run
