"""Cost of one long input: peak memory and latency of M+, MemoryLLM mode and the plain-window backbone
(the M+ paper's Table 1 and Fig. 7).

Protocol of the paper's latency figure: for an input of n tokens, the memory models inject n - window tokens
(in `chunk_tokens` chunks) and then predict the next token from the last window - 1 tokens; the backbone runs over
n - 1 tokens (BOS first, so it sees n positions) and predicts the next one. The token ids are random (cost does not
depend on content), seeded. MemoryLLM mode empties the long-term memory after every write, so it never grows.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the call (absolute, weights included, as Table 1); on
CPU the process's resident set size sampled every few ms by a background thread (psutil; without psutil, the
process-lifetime `ru_maxrss`), reported as the peak and as the increase over the level before the call. The
analytic sizes of the short-term pool and the long-term store after the call are reported beside them, and how much
of the store is on the GPU.

`placements`: M+ is measured once per placement of its long-term memory (`LTM_PLACEMENTS`: on the device, rows on
the host, rows and keys on the host), the paper keeping it on the CPU; MemoryLLM mode and the backbone have none.
Outputs: items.jsonl (resumable), cost.json, cost.md, cost.png, tensorboard/.
"""

from __future__ import annotations

import gc
import resource
import shutil
import sys
import threading
import time

import torch
from tqdm.auto import tqdm

from ..model.memory import LTM_PLACEMENTS
from . import plots
from .config import CostConfig
from .io import write_json
from .runtime import (
    MODES,
    Backbone,
    EvalInputError,
    RunDir,
    default_out,
    inject,
    item_generator,
    load_checkpoint,
    memory_view,
    resolve_device,
    resolve_dtype,
    start_memory,
)

METHODS = (*MODES, "window")


class PeakMemory:
    """Context manager measuring peak memory of the enclosed code on `device` (see the module docstring)."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval = interval_s
        self.peak_mb = self.delta_mb = 0.0

    @property
    def metric(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        return "peak RSS (psutil sampling)" if self._psutil() else "ru_maxrss (process lifetime)"

    @staticmethod
    def _psutil():
        try:
            import psutil
            return psutil
        except ImportError:
            return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        ps = self._psutil()
        if ps is None:
            self.base = self._maxrss()
            return self
        self.proc = ps.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                self.stop.wait(self.interval)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _maxrss() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024

    def __exit__(self, *exc):
        mb = 2 ** 20
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "thread"):
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.set()
            self.thread.join()
            peak = self.peak
        else:
            peak = self._maxrss()
        self.peak_mb, self.delta_mb = peak / mb, max(0, peak - self.base) / mb
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cost(cfg: CostConfig, *, model=None, memory=None) -> dict:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise EvalInputError(f"methods must be a non-empty subset of {list(METHODS)}, got {list(cfg.methods)}")
    placements = list(dict.fromkeys(cfg.placements))
    if not placements or any(p not in LTM_PLACEMENTS for p in placements):
        raise EvalInputError(f"placements must be a non-empty subset of {list(LTM_PLACEMENTS)}, got "
                             f"{list(cfg.placements)}")
    lengths = sorted({int(n) for n in cfg.lengths})
    if not lengths or lengths[0] <= cfg.window_tokens:
        raise EvalInputError(f"every length must exceed window_tokens={cfg.window_tokens}, got {cfg.lengths}")
    if model is None:
        device = resolve_device(cfg.device)
        model, memory = load_checkpoint(cfg.model, device, resolve_dtype(cfg.dtype, device))
    device = model.device
    methods = list(dict.fromkeys(cfg.methods))
    if not model.config.has_ltm:
        methods = [m for m in methods if m != "mplus"]
    fp = dict(model=str(cfg.model), window_tokens=cfg.window_tokens, chunk_tokens=cfg.chunk_tokens,
              seed=cfg.seed, dtype=str(model.dtype), device=str(device))
    run = RunDir(cfg.out or default_out("cost", cfg.model), "cost", cfg, fp, ("method", "placement", "length"),
                 overwrite=cfg.overwrite)
    cfgm = model.config
    vocab = int(cfgm.llama["vocab_size"])
    special = {cfgm.llama.get("bos_token_id"), cfgm.llama.get("eos_token_id")}
    g = item_generator(cfg.seed, "cost")
    ids = torch.randint(0, vocab, (lengths[-1],), generator=g)
    for s in special - {None}:
        if isinstance(s, int):
            ids[ids == s] = (s + 3) % vocab
    ids = ids.tolist()
    backbone = Backbone(model, cfg.prefill_block)

    def once(method: str, n: int) -> dict:
        if method == "window":
            backbone.last_logits(ids[: n - 1])
            return {"injections": 0}
        mem = start_memory(memory, method)        # a copy keeps the base memory's placement
        rest, window = ids[: n - cfg.window_tokens], ids[n - cfg.window_tokens: n - 1]
        gen = item_generator(cfg.seed, "cost", method, n)
        count = 0
        for s in range(0, len(rest), cfg.chunk_tokens):
            inject(model, mem, rest[s: s + cfg.chunk_tokens], gen, method)
            count += 1
        model.read(memory_view(mem, method), torch.tensor([window], device=device), logits_to_keep=1)
        bytes_per = torch.finfo(mem.dtype).bits // 8
        L, N, d = mem.rows.shape
        ltm_rows = mem.ltm.size if (mem.ltm is not None and method == "mplus") else 0
        s_dim = mem.ltm.key_size if mem.ltm is not None else 0
        on_device = 0   # widths of what is on the device, per row: rows unless on the host, keys likewise
        if mem.ltm is not None:
            on_device = (0 if mem.ltm.rows_on_host else d) + (0 if mem.ltm.keys_on_host else s_dim)
        return {"injections": count, "ltm_rows_per_layer": ltm_rows,
                "stm_mb": L * N * d * bytes_per / 2 ** 20,
                "ltm_mb": L * ltm_rows * ((d + s_dim) * bytes_per + 8) / 2 ** 20,
                "ltm_on_device_mb": L * ltm_rows * (on_device * bytes_per + 8) / 2 ** 20}

    def place(placement: str) -> None:
        rows, keys = LTM_PLACEMENTS[placement]
        if memory is not None:
            memory.place(device, ltm_rows=rows, ltm_keys=keys)

    variants = [(m, p) for m in methods for p in (placements if m == "mplus" else ["device"])]
    if cfg.warmup:
        for m, p in variants:
            place(p)
            once(m, min(lengths[0], cfg.window_tokens + cfg.chunk_tokens + 1))
    todo = [(n, m, p) for n in lengths for m, p in variants if (m, p, n) not in run.store]
    for n, m, p in tqdm(todo, desc="cost", unit="run", disable=not cfg.progress):
        place(p)
        best = None
        for _ in range(max(1, cfg.repeats)):
            with PeakMemory(device) as pm:
                _sync(device)
                t0 = time.perf_counter()
                extra = once(m, n)
                _sync(device)
                dt = time.perf_counter() - t0
            if best is None or dt < best["latency_s"]:
                best = {"latency_s": dt, **extra}
            best["peak_mb"] = max(best.get("peak_mb", 0.0), pm.peak_mb)
            best["delta_mb"] = max(best.get("delta_mb", 0.0), pm.delta_mb)
        run.store.add({"method": m, "placement": p, "length": n, "memory_metric": pm.metric, "device": str(device),
                       **best})
    place("device")
    rows = [run.store.get((m, p, n)) for n in lengths for m, p in variants if (m, p, n) in run.store]
    for r in rows:
        r["plot_mb"] = r["peak_mb"] if device.type == "cuda" else r["delta_mb"]
    table = ["| method | length | latency (s) | peak (MB) | increase (MB) | STM (MB) | LTM rows/layer | LTM (MB) | "
             "LTM placement | LTM on device (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['method']} | {r['length']} | {r['latency_s']:.3f} | {r['peak_mb']:.1f} | "
                     f"{r['delta_mb']:.1f} | {r.get('stm_mb', 0):.1f} | {r.get('ltm_rows_per_layer', 0)} | "
                     f"{r.get('ltm_mb', 0):.1f} | {r['placement'] if r['method'] == 'mplus' else '-'} | "
                     f"{r.get('ltm_on_device_mb', 0):.1f} |")
    summary = {"task": "cost", "model": str(cfg.model), "device": str(device), "dtype": str(model.dtype),
               "memory_metric": rows[0]["memory_metric"] if rows else None, "rows": rows,
               "table": f"cost on {device} ({rows[0]['memory_metric'] if rows else ''})\n\n" + "\n".join(table)}
    write_json(run.file("cost.json"), summary)
    run.file("cost.md").write_text(summary["table"] + "\n")
    plots.cost_plot([{**r, "peak_mb": r["plot_mb"], "method": _series(r),
                      "memory_metric": r["memory_metric"] if device.type == "cuda" else "increase over baseline RSS"}
                     for r in rows], run.file("cost.png"), str(device))
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = run.file("tensorboard")
        shutil.rmtree(tb, ignore_errors=True)
        writer = SummaryWriter(log_dir=str(tb))
        for r in rows:
            writer.add_scalar(f"cost/{_series(r)}/latency_s", r["latency_s"], global_step=r["length"])
            writer.add_scalar(f"cost/{_series(r)}/peak_mb", r["plot_mb"], global_step=r["length"])
        writer.close()
    return summary


def _series(row: dict) -> str:
    """A row's series in plots and TensorBoard: the method, with M+'s placement when it is not the default."""
    return row["method"] if row.get("placement", "device") == "device" else f"{row['method']}_{row['placement']}"
