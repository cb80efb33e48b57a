"""Inference benchmark and profiler for M+.

    python -m mplus_lightning.bench inference [--shape mid|tiny|8b] [--device cpu|cuda] [--dtype float32|bfloat16]
                                              [--threads 2] [--repeats R] [--out FILE.json]
    python -m mplus_lightning.bench training  [--shape mid] [--threads 2] [--repeats 3]    (see bench_training.py)
    python -m mplus_lightning.bench profile   [--shape mid] [--phases inject,prefill,generate,train_single] [--top 15]

`inference` prints one JSON object (and writes it with --out):
  * model      seconds for one inject of a chunk, the read prefill right after it (which also projects the changed
               pool's K/V), the read prefill against an unchanged pool (last logit only, and all logits), one generate
               (prompt + new tokens, never stopping early), each timed round-robin over `repeats` rounds so that machine
               noise hits every operation alike; medians, minima and all samples are reported;
  * stream     a stream of injections of fresh chunks: total and per-injection seconds (first and last 10% apart, to
               show that an update does not get slower as the long-term memory grows);
  * retrieval  the retriever alone (`mean_sigmoid_scores` + `select_oldest_first`) over 10k / 100k / 1M long-term
               rows of one layer, beside a bare q @ k.T GEMM of the same size; the effective key-scan bandwidth; the
               bytes of the long-term store (linear in rows) and the transient memory of a retrieval (constant in
               rows: no [n, M] score matrix is materialised);
  * memory     peak RSS (CPU) or torch.cuda.max_memory_allocated per operation (CUDA; the 8b shape prints the paper's
               21.2 GB beside it).
`profile` runs torch.profiler over inject / prefill / generate (or a training step: `--phases train_single`, ...) with
labelled regions (memory-prefix K/V, retrieval, attention, MLP, lm_head, commit, ...) and prints where the time goes.
The labels are in the model code (`mplus_lightning.model.profiling.region`); attention and MLP, transformers'
modules, get them from forward hooks.

Shapes: `tiny` (seconds, for tests), `mid` (8 layers, d=256, the default: about a minute on 2 idle CPU cores) and `8b`
(Llama-3.1-8B sizes with random weights; CUDA + bfloat16 only).

Threads: after each parallel op torch's OpenMP threads spin for a while before they sleep. By default they spin for
milliseconds, so when another process holds a core a 2-thread run can slow down ~10x (measured here: inject 0.08 s
-> 1.4 s); with OMP_WAIT_POLICY=PASSIVE they sleep at once and every parallel op pays a wake-up (~70 us here against
~5 us for a 256x256 add), which an M+ step, with 4-6x the ops of a plain Llama step, pays more. `make bench` sets a
bounded spin, GOMP_SPINCOUNT=10000 (0.1-0.3 ms here; KMP_BLOCKTIME=1 for Intel's OpenMP); these must be in the
environment before torch is imported. The JSON records them (`env`), the load average and a warning when busy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .model import profiling, retriever as retriever_module
from .model.configuration import MPlusConfig
from .model.memory import LongTermMemory, MemoryState
from .model.mplus import MPlus
from .model.retriever import mean_sigmoid_scores, select_oldest_first

PAPER_8B_GPU_MB = 21177.76
"""M+ (no offload) peak GPU memory during LongBook inference, paper Table 1, in MiB."""

FIRST_TOKEN = 3
"""Benchmark token ids are drawn from [3, vocab): never pad (0), BOS (1) or EOS (2)."""


# ---- shapes ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A model shape plus the workload sizes of the benchmark."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    num_tokens: int
    """K: rows written per update."""
    stm_blocks: int
    """N = stm_blocks * K short-term rows per layer."""
    ltm_blocks: int
    """K0 = ltm_blocks * K long-term rows read per layer."""
    selector_width: int
    lora_r: int
    ltm_rows: int
    """Random long-term rows per layer put into the memory before timing."""
    chunk_tokens: int
    prompt_tokens: int
    new_tokens: int
    stream_injections: int
    retrieval_rows: tuple[int, ...]
    retrieval_query_tokens: int
    repeats: int
    rope_theta: float = 10000.0
    max_positions: int = 8192
    cuda_only: bool = False

    @property
    def stm_rows(self) -> int:
        return self.stm_blocks * self.num_tokens

    @property
    def ltm_read_rows(self) -> int:
        return self.ltm_blocks * self.num_tokens

    def config(self, ltm_capacity: int) -> MPlusConfig:
        llama = dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.mlp,
                     num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                     head_dim=self.head_dim, max_position_embeddings=self.max_positions, rms_norm_eps=1e-5,
                     rope_theta=self.rope_theta, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        return MPlusConfig(llama=llama, num_tokens=self.num_tokens, num_blocks=self.stm_blocks + self.ltm_blocks,
                           num_ltm_blocks=self.ltm_blocks, add_selector=True, selector_hidden_dim=self.selector_width,
                           lora_r=self.lora_r, lora_alpha=2 * self.lora_r, lora_dropout=0.0,
                           add_encoder_retriever=False, ltm_capacity=ltm_capacity)

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(N=self.stm_rows, K0=self.ltm_read_rows, K=self.num_tokens, s=self.selector_width,
                 num_blocks=self.stm_blocks + self.ltm_blocks, num_ltm_blocks=self.ltm_blocks)
        d["retrieval_rows"] = list(self.retrieval_rows)
        return d


SHAPES: dict[str, Shape] = {
    "tiny": Shape("tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=512, num_tokens=16,
                  stm_blocks=4, ltm_blocks=2, selector_width=16, lora_r=4, ltm_rows=1000, chunk_tokens=64,
                  prompt_tokens=64, new_tokens=8, stream_injections=20, retrieval_rows=(4_000, 40_000, 400_000),
                  retrieval_query_tokens=64, repeats=3),
    "mid": Shape("mid", layers=8, hidden=256, heads=8, kv_heads=4, head_dim=32, mlp=688, vocab=4096, num_tokens=64,
                 stm_blocks=32, ltm_blocks=8, selector_width=64, lora_r=8, ltm_rows=20_000, chunk_tokens=256,
                 prompt_tokens=256, new_tokens=32, stream_injections=200,
                 retrieval_rows=(10_000, 100_000, 1_000_000), retrieval_query_tokens=256, repeats=7),
    "8b": Shape("8b", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, vocab=128256,
                num_tokens=256, stm_blocks=40, ltm_blocks=10, selector_width=256, lora_r=16, ltm_rows=20_000,
                chunk_tokens=256, prompt_tokens=256, new_tokens=32, stream_injections=200,
                retrieval_rows=(10_000, 100_000, 1_000_000), retrieval_query_tokens=256, repeats=5,
                rope_theta=500000.0, max_positions=131072, cuda_only=True),
}

RETRIEVAL_MAX_REPEATS = {1_000_000: 2}
"""Timed repeats of the retriever are capped at this many for stores of at least this many rows."""


# ---- measuring ------------------------------------------------------------------------------------------------------
class Clock:
    """Wall-clock timing that waits for queued CUDA work before and after."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(wall seconds, fn's result); the process CPU seconds of the call are left in `self.cpu`."""
        self.sync()
        cpu, start = time.process_time(), time.perf_counter()
        out = fn()
        self.sync()
        wall = time.perf_counter() - start
        self.cpu = time.process_time() - cpu
        return wall, out


def _num(x: float) -> float:
    return float(f"{x:.6g}")


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": _num(statistics.median(samples)), "min": _num(min(samples)), "max": _num(max(samples)),
            "n": len(samples), "samples": [_num(s) for s in samples]}


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the peak
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc malloc_trim), so that RSS growth shows new allocations."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TransientMemory:
    """Extra memory a block of code needs above what was held when it started.

    CUDA: torch.cuda.max_memory_allocated after a reset. CPU: a thread samples the RSS every ~0.2 ms (getrusage's peak
    is a high-water mark of the whole run and cannot isolate one call).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bytes = 0

    def __enter__(self) -> "TransientMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(0, max(self._peak, rss_bytes()) - self._base)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME")


def thread_env() -> dict[str, str]:
    """The settings of `THREAD_ENV` the environment sets: they move CPU timings (module docstring)."""
    return {k: os.environ[k] for k in THREAD_ENV if k in os.environ}


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    import peft
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "threads_requested": threads,
           "interop_threads": torch.get_num_interop_threads(),
           "env": thread_env(),
           "load_average_start": _load_average()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


# ---- building the model and its memory ------------------------------------------------------------------------------
def ltm_capacity_for(shape: Shape, repeats: int, warmup: int) -> int:
    """Long-term capacity: the random rows plus every row the timed injections will evict (nothing leaves)."""
    injections = warmup + repeats + shape.stream_injections + 2
    return shape.ltm_rows + shape.num_tokens * injections


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, ltm_capacity: int) -> MPlus:
    """Random-weight MPlus, built directly on `device` in `dtype` (the 8b shape never exists in fp32 on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MPlus(shape.config(ltm_capacity))
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def random_ids(shape: Shape, tokens: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(FIRST_TOKEN, shape.vocab, (1, tokens), generator=generator).to(device)


def random_ltm(num_layers: int, rows: int, hidden: int, width: int, min_age: int, *, dtype: torch.dtype,
               device: torch.device, generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random long-term rows [L, M, d] (hidden-state scale), keys [L, M, s] and ages [L, M] >= min_age."""
    g = torch.Generator(device=device).manual_seed(generator_seed)
    r = torch.empty(num_layers, rows, hidden, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g)
    k = torch.empty(num_layers, rows, width, dtype=dtype, device=device).normal_(0.0, width ** -0.5, generator=g)
    a = torch.randint(min_age, min_age + 16 * rows, (num_layers, rows), generator=g, device=device)
    return r, k, a


def prepared_memory(model: MPlus, shape: Shape, device: torch.device, ids_gen: torch.Generator) -> MemoryState:
    """A fresh memory, one inject (fills the pool), then `shape.ltm_rows` random long-term rows per layer."""
    memory = model.new_memory(seed=0)
    model.inject(memory, random_ids(shape, shape.chunk_tokens, ids_gen, device))
    rows, keys, ages = random_ltm(shape.layers, shape.ltm_rows, shape.hidden, shape.selector_width,
                                  min_age=shape.stm_rows, dtype=model.dtype, device=device)
    memory.ltm.add(rows, keys, ages)
    return memory


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def ltm_bytes(ltm: LongTermMemory) -> dict[str, int]:
    """Allocated bytes of a long-term store (its buffers, including room not yet filled) and of its filled part."""
    filled = _tensor_bytes(*(t[:, : ltm.size] for t in (ltm.rows, ltm.keys, ltm.ages)))
    return {"allocated": _tensor_bytes(ltm.rows, ltm.keys, ltm.ages), "filled": filled, "rows_per_layer": ltm.size,
            "capacity_per_layer": ltm.capacity}


# ---- the benchmark --------------------------------------------------------------------------------------------------
def bench_model(model: MPlus, memory: MemoryState, shape: Shape, device: torch.device, repeats: int, warmup: int,
                ids_gen: torch.Generator) -> dict[str, Any]:
    """inject / read right after it / read (last logit) / read (all logits) / generate, timed round-robin.

    A read after an inject also projects the changed short-term pool's K/V (then kept for later reads of the same
    memory, `MemoryState.kv_store`): `read_after_inject` times that, the reads after it the prefill against an
    unchanged pool (as `gpu_check`'s prefill)."""
    clock = Clock(device)
    evict_gen = torch.Generator().manual_seed(1)
    prompt = random_ids(shape, shape.prompt_tokens, ids_gen, device)
    n_out = shape.prompt_tokens + shape.new_tokens

    def generate():
        out = model.generate(memory, prompt, shape.new_tokens, eos_token_id=None)
        if out.shape[1] != n_out:
            raise RuntimeError(f"generate returned {out.shape[1]} ids, expected {n_out}")
        return out

    def read_last_logit():
        return model.read(memory, prompt, logits_to_keep=1)

    ops: dict[str, Callable[[], Any]] = {   # in this order: the first read follows the inject, the others do not
        "inject": lambda: model.inject(memory, random_ids(shape, shape.chunk_tokens, ids_gen, device),
                                       generator=evict_gen),
        "read_after_inject": read_last_logit,
        "read_prefill_last_logit": read_last_logit,
        "read_prefill_full_logits": lambda: model.read(memory, prompt),
        "generate": generate,
    }
    ltm_before = memory.ltm.size
    for _ in range(warmup):
        for fn in ops.values():
            clock.time(fn)
    times: dict[str, list[float]] = {name: [] for name in ops}
    cpu: dict[str, list[float]] = {name: [] for name in ops}
    peaks: dict[str, int] = {name: 0 for name in ops}
    peaks_without_ltm: dict[str, int] = {name: 0 for name in ops}
    static = torch.cuda.memory_allocated() if clock.cuda else None
    for _ in range(repeats):
        for name, fn in ops.items():
            if clock.cuda:
                torch.cuda.reset_peak_memory_stats()
                ltm_now = ltm_bytes(memory.ltm)["allocated"]
            dt, _ = clock.time(fn)
            times[name].append(dt)
            cpu[name].append(clock.cpu)
            if clock.cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
                peaks_without_ltm[name] = max(peaks_without_ltm[name], torch.cuda.max_memory_allocated() - ltm_now)
    res: dict[str, Any] = {f"{name}_s": summary(t) for name, t in times.items()}
    res["cpu_s_median"] = {name: _num(statistics.median(c)) for name, c in cpu.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    res.update(
        inject_tokens_per_s=_num(shape.chunk_tokens / med["inject"]),
        prefill_tokens_per_s=_num(shape.prompt_tokens / med["read_prefill_last_logit"]),
        full_logits_extra_s=_num(med["read_prefill_full_logits"] - med["read_prefill_last_logit"]),
        pool_kv_after_inject_s_est=_num(med["read_after_inject"] - med["read_prefill_last_logit"]),
        decode_s_per_token_est=_num(max(0.0, med["generate"] - med["read_prefill_last_logit"])
                                    / max(1, shape.new_tokens - 1)),
        prefix_rows_per_layer=model.prefix_length(memory),
        ltm_rows_per_layer_during=[ltm_before, memory.ltm.size],
        warmup_rounds=warmup, repeats=repeats,
        note="round-robin: each repeat runs inject, read(last logit) right after it (read_after_inject: it also "
             "projects the changed pool's K/V), read(last logit) and read(all logits) against the unchanged pool, "
             "generate once; pool_kv_after_inject_s_est = read_after_inject - read_prefill_last_logit; "
             "decode_s_per_token_est = (generate - read_last_logit) / (new_tokens - 1); cpu_s_median = process CPU "
             "seconds (all threads; on a shared machine wall >> cpu/threads means the run was descheduled)",
    )
    if clock.cuda:
        res["cuda_memory"] = {"allocated_before_bytes": static,
                              "peak_allocated_bytes": peaks,
                              "peak_allocated_MiB": {k: _num(v / 2**20) for k, v in peaks.items()},
                              "peak_without_ltm_store_MiB": {k: _num(v / 2**20) for k, v in peaks_without_ltm.items()}}
    return res


def bench_stream(model: MPlus, memory: MemoryState, shape: Shape, device: torch.device,
                 ids_gen: torch.Generator) -> dict[str, Any]:
    """`shape.stream_injections` injections of fresh chunks, one after another."""
    clock = Clock(device)
    evict_gen = torch.Generator().manual_seed(2)
    chunks = [random_ids(shape, shape.chunk_tokens, ids_gen, device) for _ in range(shape.stream_injections)]
    before = memory.ltm.size
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    cpu_start, total_start = time.process_time(), time.perf_counter()
    for chunk in chunks:
        dt, _ = clock.time(lambda c=chunk: model.inject(memory, c, generator=evict_gen))
        times.append(dt)
        cpu.append(clock.cpu)
    total = time.perf_counter() - total_start
    cpu_total = time.process_time() - cpu_start
    tenth = max(1, len(times) // 10)
    res = {"injections": len(times), "chunk_tokens": shape.chunk_tokens, "total_s": _num(total),
           "cpu_total_s": _num(cpu_total),
           "per_injection_s": {"mean": _num(total / len(times)), "median": _num(statistics.median(times)),
                               "min": _num(min(times)), "max": _num(max(times)),
                               "first_10pct_mean": _num(statistics.fmean(times[:tenth])),
                               "last_10pct_mean": _num(statistics.fmean(times[-tenth:]))},
           "per_injection_cpu_s": {"median": _num(statistics.median(cpu)),
                                   "first_10pct_mean": _num(statistics.fmean(cpu[:tenth])),
                                   "last_10pct_mean": _num(statistics.fmean(cpu[-tenth:]))},
           "tokens_per_s": _num(len(times) * shape.chunk_tokens / total),
           "ltm_rows_per_layer": [before, memory.ltm.size]}
    if clock.cuda:
        res["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return res


def bench_retrieval(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int,
                    rows_list: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The retriever of one layer over stores of increasing size, beside a bare q @ k.T GEMM of the same size."""
    clock = Clock(device)
    n, s, d, k0 = shape.retrieval_query_tokens, shape.selector_width, shape.hidden, shape.ltm_read_rows
    g = torch.Generator(device=device).manual_seed(3)
    queries = torch.empty(1, n, s, dtype=dtype, device=device).normal_(0.0, 1.0, generator=g)
    elt = queries.element_size()
    cases = []
    for M in rows_list or shape.retrieval_rows:
        reps = min([repeats] + [cap for size, cap in RETRIEVAL_MAX_REPEATS.items() if M >= size])
        rss0 = rss_bytes()
        ltm = LongTermMemory.from_tensors(*random_ltm(1, M, d, s, min_age=shape.stm_rows, dtype=dtype, device=device,
                                                      generator_seed=M), capacity=M)
        store = ltm_bytes(ltm)
        store_rss_growth = rss_bytes() - rss0
        _, keys, ages = ltm.view(0)

        def retrieve(keys=keys, ages=ages):   # bound now: the loop deletes these names before the next size
            return select_oldest_first(mean_sigmoid_scores(queries, keys), ages, k0)

        clock.time(retrieve)                          # warm-up
        release_free_memory()                         # so that the measured call has to fault its scratch in anew
        with TransientMemory(device) as transient:
            idx = clock.time(retrieve)[1]
        if tuple(idx.shape) != (1, min(k0, M)):
            raise RuntimeError(f"retrieval returned {tuple(idx.shape)}")
        scores_out = torch.empty(1, n, M, dtype=dtype, device=device)

        def gemm(keys=keys, scores_out=scores_out):
            return torch.matmul(queries, keys.t(), out=scores_out)

        clock.time(gemm)                              # warm-up; touches the output pages
        t_ret, t_gemm = [], []
        for _ in range(reps):
            t_ret.append(clock.time(retrieve)[0])
            t_gemm.append(clock.time(gemm)[0])
        del scores_out
        tr, tg = statistics.median(t_ret), statistics.median(t_gemm)
        flop = 2.0 * n * s * M
        cases.append({
            "rows": M, "repeats": reps,
            "retrieval_s": summary(t_ret), "gemm_s": summary(t_gemm),
            "ratio_retrieval_over_gemm": _num(tr / tg),
            "key_bytes": M * s * elt,
            "key_scan_GBps": _num(M * s * elt / tr / 1e9),
            "retrieval_GFLOPs": _num(flop / tr / 1e9), "gemm_GFLOPs": _num(flop / tg / 1e9),
            "ltm_store_bytes": store["allocated"],
            "ltm_store_bytes_per_row": _num(store["allocated"] / M),
            "store_rss_growth_bytes": store_rss_growth if device.type == "cpu" else None,
            "retrieval_transient_bytes": transient.bytes,
            "score_matrix_bytes_if_materialised": n * M * elt,
            "score_block_bytes": min(n * M * elt, retriever_module.SCORE_BLOCK_BYTES.get(device.type, 0)),
            "peak_rss_bytes": peak_rss_bytes(),
        })
        del ltm, keys, ages, idx
        if clock.cuda:
            torch.cuda.empty_cache()
    first = cases[0]
    return {
        "query_tokens": n, "width": s, "k0": k0, "dtype": str(dtype).replace("torch.", ""),
        "score_block_bytes": retriever_module.SCORE_BLOCK_BYTES.get(device.type),
        "cases": cases,
        "linearity": [{"rows": c["rows"], "rows_ratio": _num(c["rows"] / first["rows"]),
                       "store_bytes_ratio": _num(c["ltm_store_bytes"] / first["ltm_store_bytes"]),
                       "transient_bytes": c["retrieval_transient_bytes"],
                       "score_matrix_bytes_if_materialised": c["score_matrix_bytes_if_materialised"]}
                      for c in cases],
        "note": "retrieval = mean_sigmoid_scores + select_oldest_first for one layer and one query of query_tokens; "
                "gemm = torch.matmul(q [1,n,s], keys.T) into a preallocated [1,n,M] buffer; transient = memory "
                "above the resident set while one retrieval runs (sampled RSS on CPU, max_memory_allocated on CUDA); "
                "on CPU glibc may keep 2-4 freed score blocks resident, so it is a few score_block_bytes, whatever M",
    }


def run_inference(shape: Shape, device: torch.device, dtype: torch.dtype, threads: int, repeats: int | None = None,
                  warmup: int = 1, include: tuple[str, ...] = ("model", "stream", "retrieval")) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready result."""
    check_shape_device(shape, device, dtype)
    torch.set_num_threads(threads)
    repeats = repeats or shape.repeats
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "inference", "shape": shape.describe(),
                              "settings": {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                                           "repeats": repeats, "warmup": warmup, **environment(device, threads)}}
    # Retrieval first: its memory figures are then not masked by the model's earlier high-water mark.
    if "retrieval" in include:
        result["retrieval"] = bench_retrieval(shape, device, dtype, repeats)
    if "model" in include or "stream" in include:
        capacity = ltm_capacity_for(shape, repeats, warmup)
        t0 = time.perf_counter()
        model = build_model(shape, device, dtype, capacity)
        ids_gen = torch.Generator().manual_seed(0)
        memory = prepared_memory(model, shape, device, ids_gen)
        setup_s = time.perf_counter() - t0
        result["memory"] = {
            "setup_s": _num(setup_s),
            "rss_after_setup_bytes": rss_bytes(),
            "model_parameter_bytes": _tensor_bytes(*model.parameters()),
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "stm_bytes": _tensor_bytes(memory.rows, memory.ranks, memory.ages),
            "ltm_bytes_after_setup": ltm_bytes(memory.ltm),
        }
        if "model" in include:
            result["model"] = bench_model(model, memory, shape, device, repeats, warmup, ids_gen)
        if "stream" in include:
            result["stream"] = bench_stream(model, memory, shape, device, ids_gen)
        result["memory"]["ltm_bytes_at_end"] = ltm_bytes(memory.ltm)
        result["memory"]["rss_at_end_bytes"] = rss_bytes()
        if device.type == "cuda":
            result["memory"]["cuda"] = cuda_memory_report(result, memory)
    result["memory"] = result.get("memory", {})
    result["memory"]["peak_rss_bytes"] = peak_rss_bytes()
    result["settings"]["load_average_end"] = _load_average()
    result["wall_s"] = _num(time.perf_counter() - started)
    busy = busy_machine_warning(result["settings"], threads)
    if busy:
        result["warnings"] = [busy]
        print(f"warning: {busy}", file=sys.stderr)
    return result


def busy_machine_warning(settings: dict[str, Any], threads: int) -> str | None:
    """A warning when other processes competed for the CPUs (load average before or after the run)."""
    cpus = settings.get("cpu_count") or 1
    loads = [x[0] for x in (settings.get("load_average_start"), settings.get("load_average_end")) if x]
    # Our own run adds about `threads` to the end figure.
    others = max([0.0] + loads[:1] + [x - threads for x in loads[1:]])
    if settings.get("device") == "cpu" and others > 0.5 * cpus:
        msg = f"the machine was busy (load average {loads} on {cpus} CPUs): timings are inflated"
        spin_bounded = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or "GOMP_SPINCOUNT" in os.environ
        if threads > 1 and not spin_bounded:
            msg += (f"; with {threads} spin-waiting OpenMP threads a descheduled thread can slow every parallel region "
                    "10x: rerun with GOMP_SPINCOUNT=10000 (as make bench) or --threads 1")
        return msg
    return None


def cuda_memory_report(result: dict[str, Any], memory: MemoryState) -> dict[str, Any]:
    """Peak GPU memory over the timed operations, and the same without the long-term store (the paper keeps it on
    the host)."""
    cm = result.get("model", {}).get("cuda_memory", {})
    peaks, without = cm.get("peak_allocated_MiB", {}), cm.get("peak_without_ltm_store_MiB", {})
    return {"peak_allocated_MiB": max(peaks.values()) if peaks else None,
            "peak_without_ltm_store_MiB": max(without.values()) if without else None,
            "ltm_store_on_gpu_MiB_at_end": _num(ltm_bytes(memory.ltm)["allocated"] / 2**20),
            "paper_8b_peak_MiB": PAPER_8B_GPU_MB,
            "note": "paper: max GPU memory allocated during LongBook inference with the LTM on the host (Table 1, "
                    "M+ 21,177.76 MB); here the long-term store lives on the GPU, so compare "
                    "peak_without_ltm_store_MiB (per operation in model.cuda_memory); the paper's model also holds the "
                    "unused encoder_query_proj (~0.14 GB bf16), ours does not"}


def check_shape_device(shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
    if shape.cuda_only and device.type != "cuda":
        raise SystemExit(f"--shape {shape.name} needs --device cuda (and --dtype bfloat16): at Llama-3.1-8B size "
                         "the weights and memory need ~20 GB and one pass takes minutes on a CPU, the whole benchmark "
                         "hours. Use --shape mid on a CPU.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / on this machine")
    if shape.cuda_only and dtype != torch.bfloat16:
        print(f"warning: --shape {shape.name} is meant for --dtype bfloat16 (the paper's setting)", file=sys.stderr)


# ---- profiling ------------------------------------------------------------------------------------------------------
REGIONS = {
    # label: the region it sits in (None: top level)
    "memory_kv": None,
    "read_prefix": None,
    "retrieval.scores": "read_prefix",
    "retrieval.select": "read_prefix",
    "attention": None,
    "mlp": None,
    "lm_head": None,
    "newest_block": None,
    "commit": None,
    "commit.ltm_keys": "commit",
    "commit.ltm_add": "commit",
    "commit.sample_evictions": "commit",
}
HOOKED_REGIONS = {"attention": "self_attn", "mlp": "mlp"}
"""Regions marked by forward hooks on each decoder layer's submodule of that name (transformers' code, not ours)."""
REGION_DOCS = {
    "memory_kv": "RMSNorm + k/v projection (+ LoRA) + RoPE of the memory prefix rows (BOS, retrieved LTM, STM)",
    "read_prefix": "building a layer's read prefix: retrieval, gather of K0 rows, concatenation with the STM",
    "attention": "q/k/v/o projections (+ LoRA), RoPE, attention over prefix + tokens without a mask (real tokens)",
    "mlp": "gate/up/down (+ LoRA) on the real tokens",
    "lm_head": "final norm + lm_head",
    "commit": "eviction, fixed-slot write, LTM append (incl. f_k keys of the evicted rows)",
}


def hook_region(module: torch.nn.Module, label: str) -> list:
    """Mark every forward of `module` as the region `label`; returns the hook handles (`.remove()` them)."""
    running: list[profiling.region] = []

    def enter(_module, _args):
        running.append(profiling.region(label))
        running[-1].__enter__()

    def leave(_module, _args, _output):
        running.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


@contextlib.contextmanager
def labelled_regions(model: MPlus, cpu_ms: dict[str, float] | None = None):
    """Hooks that label attention and MLP of `model`'s decoder layers for the duration (the other regions are
    labelled in the model code).

    With `cpu_ms`, also add each region's CPU time of the calling thread (time.thread_time, inclusive) to it: with one
    torch thread that is all the work, and unlike wall time it does not count time the process was descheduled.
    """
    handles = []
    try:
        for layer in model.layers:
            for label, name in HOOKED_REGIONS.items():
                handles += hook_region(getattr(layer, name), label)
        if cpu_ms is None:
            yield
        else:
            with profiling.thread_cpu_times(cpu_ms):
                yield
    finally:
        for handle in handles:
            handle.remove()


def region_times(events, calls: int, thread_cpu_ms: dict[str, float]) -> dict[str, dict]:
    """Per labelled region: profiled ms and thread-CPU ms per call, calls per call, the region it sits in.

    On CUDA each region also appears as a device-side annotation with no CPU time: only its CPU range counts (the
    device copy used to overwrite it: every region read 0 ms in the first H100 profile)."""
    from torch.autograd import DeviceType

    regions = {}
    for e in events:
        if e.key in REGIONS and e.device_type == DeviceType.CPU:
            regions[e.key] = {"ms_per_call": _num(e.cpu_time_total / 1e3 / calls), "calls": e.count // calls,
                              "thread_cpu_ms_per_call": _num(thread_cpu_ms.get(e.key, 0.0) / calls),
                              "inside": REGIONS[e.key]}
    return regions


INFERENCE_PHASES = ("inject", "prefill", "prefill_full_logits", "generate")
TRAINING_PHASES = {f"train_{kind}": kind for kind in ("full", "revisit", "multi", "multi_one_chunk", "single")}
"""`profile --phases train_single,...`: one optimizer step of that step kind of the training benchmark (CPU, fp32).
The backward's ops run outside the labelled regions (which label forwards): see its top ops."""


def run_profile(shape: Shape, device: torch.device, dtype: torch.dtype, threads: int, phases: tuple[str, ...],
                calls: int = 3, top: int = 15) -> dict[str, Any]:
    """torch.profiler over each phase; regions (inclusive) and the top ops by self time, per call."""
    from torch.profiler import ProfilerActivity, profile

    check_shape_device(shape, device, dtype)
    torch.set_num_threads(threads)
    clock = Clock(device)
    fns, models = {}, {}
    if set(phases) & set(INFERENCE_PHASES):
        capacity = ltm_capacity_for(shape, 4 * calls, 2)
        model = build_model(shape, device, dtype, capacity)
        ids_gen = torch.Generator().manual_seed(0)
        memory = prepared_memory(model, shape, device, ids_gen)
        prompt = random_ids(shape, shape.prompt_tokens, ids_gen, device)
        fns = {
            "inject": lambda: model.inject(memory, random_ids(shape, shape.chunk_tokens, ids_gen, device)),
            "prefill": lambda: model.read(memory, prompt, logits_to_keep=1),
            "prefill_full_logits": lambda: model.read(memory, prompt),
            "generate": lambda: model.generate(memory, prompt, shape.new_tokens, eos_token_id=None),
        }
        models = dict.fromkeys(fns, model)
    if set(phases) & set(TRAINING_PHASES):   # one optimizer step of a step kind, as `bench training` times it
        from .bench_training import training_setup, training_step
        module, opt = training_setup(shape)
        step_gen = torch.Generator().manual_seed(1)
        for phase, kind in TRAINING_PHASES.items():
            fns[phase] = lambda kind=kind: training_step(module, opt, kind, shape, step_gen)
            models[phase] = module.model
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict[str, Any] = {"benchmark": "profile", "shape": shape.describe(),
                           "settings": {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                                        "calls": calls, **environment(device, threads)},
                           "regions_doc": REGION_DOCS, "phases": {}}
    for phase in phases:
        fn = fns[phase]
        clock.time(fn)
        plain = [clock.time(fn)[0] for _ in range(calls)]
        cpu_ms: dict[str, float] = {}
        with labelled_regions(models[phase], cpu_ms), profile(activities=activities) as prof:
            start, cpu_start = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            clock.sync()
            profiled_ms = (time.perf_counter() - start) * 1e3 / calls
            thread_cpu_ms = (time.thread_time() - cpu_start) * 1e3 / calls
        events = prof.key_averages()
        regions = region_times(events, calls, cpu_ms)
        wall_ms = statistics.median(plain) * 1e3
        for r in regions.values():
            r["pct_of_profiled"] = _num(100 * r["ms_per_call"] / profiled_ms) if profiled_ms else None
            r["pct_of_thread_cpu"] = _num(100 * r["thread_cpu_ms_per_call"] / thread_cpu_ms) if thread_cpu_ms else None
        top_level = sum(r["ms_per_call"] for r in regions.values() if r["inside"] is None)
        top_level_cpu = sum(r["thread_cpu_ms_per_call"] for r in regions.values() if r["inside"] is None)
        def self_time(e) -> float:   # microseconds; on CUDA the kernels' time, on CPU the op's own CPU time
            return getattr(e, "self_device_time_total", 0.0) if device.type == "cuda" else e.self_cpu_time_total

        ops = sorted((e for e in events if e.key not in REGIONS), key=lambda e: -self_time(e))[:top]
        out["phases"][phase] = {
            "wall_ms_unprofiled_median": _num(wall_ms),
            "profiled_wall_ms_per_call": _num(profiled_ms),
            "thread_cpu_ms_per_call": _num(thread_cpu_ms),
            "regions": regions,
            "outside_regions_ms_per_call": _num(profiled_ms - top_level),
            "outside_regions_thread_cpu_ms_per_call": _num(thread_cpu_ms - top_level_cpu),
            "top_ops_by_self_time": [{"op": e.key, "calls": e.count // calls,
                                      "self_ms_per_call": _num(self_time(e) / 1e3 / calls),
                                      "pct": _num(100 * self_time(e) / 1e3 / calls / profiled_ms)}
                                     for e in ops],
        }
    out["settings"]["load_average_end"] = _load_average()
    return out


# ---- command line ---------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_out_dir(parser: argparse.ArgumentParser, out: str) -> None:
    """Create --out's directory, or refuse the path in one line (a directory, or under a file)."""
    if os.path.isdir(out):
        parser.error(f"--out {out} is a directory; pass a file path such as {os.path.join(out, 'result.json')}")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        blocker = parent
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        why = f"{blocker} is a file" if os.path.isfile(blocker) else e.strerror
        parser.error(f"--out {out}: cannot create its directory ({why}); pass a writable path")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m mplus_lightning.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    common.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    common.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    common.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    common.add_argument("--out", default=None, help="also write the JSON here")
    p_inf = sub.add_parser("inference", parents=[common], help="latency, retrieval and memory figures (JSON)")
    p_inf.add_argument("--repeats", type=int, default=None, help="timed rounds (default: per shape; mid 7)")
    p_inf.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    p_inf.add_argument("--only", default="model,stream,retrieval",
                       help="comma-separated sections to run (default: model,stream,retrieval)")
    p_train = sub.add_parser("training", parents=[common],
                             help="optimizer-step time and FLOP/s per step kind vs a plain Llama step (JSON)")
    p_train.add_argument("--repeats", type=int, default=3, help="timed steps per kind (default 3)")
    p_prof = sub.add_parser("profile", parents=[common], help="torch.profiler breakdown of inject/prefill/generate")
    p_prof.add_argument("--phases", default="inject,prefill,generate",
                        help="comma-separated: inject, prefill, prefill_full_logits, generate, and the training "
                             "step kinds train_full, train_revisit, train_multi, train_multi_one_chunk, "
                             "train_single (CPU float32)")
    p_prof.add_argument("--calls", type=int, default=3)
    p_prof.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    if args.out:   # checked before the run, not after it: a minute of benchmark lost to a bad path
        make_out_dir(parser, args.out)

    shape = SHAPES[args.shape]
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    if args.command == "inference":
        if args.repeats is not None and args.repeats < 1:
            parser.error("--repeats must be >= 1")
        include = tuple(x.strip() for x in args.only.split(",") if x.strip())
        unknown = set(include) - {"model", "stream", "retrieval"}
        if unknown:
            parser.error(f"--only: unknown sections {sorted(unknown)}")
        result = run_inference(shape, device, dtype, args.threads, args.repeats, args.warmup, include)
    elif args.command == "training":
        if args.device != "cpu" or shape.cuda_only:
            parser.error("training: CPU float32 only for now (shapes tiny, mid)")
        from .bench_training import run_training, summary
        load_start = _load_average()
        result = run_training(shape, args.threads, args.repeats)
        result.update(load_average_start=load_start, load_average_end=_load_average(), env=thread_env(),
                      cpu=_cpu_name())
        print(summary(result), file=sys.stderr)
    else:
        phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
        unknown = [p for p in phases if p not in INFERENCE_PHASES and p not in TRAINING_PHASES]
        if unknown:
            parser.error(f"--phases: unknown {unknown}; choose from {[*INFERENCE_PHASES, *TRAINING_PHASES]}")
        if set(phases) & set(TRAINING_PHASES) and (args.device != "cpu" or dtype != torch.float32):
            parser.error("--phases train_*: the training step runs on CPU in float32 only for now")
        result = run_profile(shape, device, dtype, args.threads, phases, args.calls, args.top)
    emit(result, args.out, indent=2)
    return result


def emit(result: dict[str, Any], out: str | None, indent: int | None = None) -> None:
    """Print the result as JSON (flushed: a log tail shows it at once) and, with `out`, write the same text there."""
    text = json.dumps(result, indent=indent)
    print(text, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
