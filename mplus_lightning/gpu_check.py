"""One-command GPU check of M+ at Llama-3.1-8B size: `make gpu-check`, or

    python -m mplus_lightning.gpu_check --shape 8b [--out FILE.json] [--placements device,rows_on_host,all_on_host]
    python -m mplus_lightning.gpu_check --shape tiny            # the same script on CPU in seconds (tests run it)

On a CUDA machine with nothing but this repository it builds the `8b` shape with random weights in bfloat16 (random
LoRA adapters too, so that folding them is not trivial), injects 512 tokens (a full short-term pool of 10,240 rows
per layer), adds 150,000 random long-term rows per layer, and then, for each placement of the long-term memory:

  device        rows and retrieval keys on the GPU (~42 GB at 8B)
  rows_on_host  rows in host memory, keys on the GPU: a read copies only the K0 rows it retrieves per layer
  all_on_host   rows and keys in host memory: each layer's keys are copied at every read (the official layout)

it times a prefill of 256 tokens (retrieval included), a decode of 32 tokens with the read adapter folded into the
weights and without (both as CUDA graphs), and records peak GPU memory (`torch.cuda.max_memory_allocated`). Then one
training step of each kind (full, revisit, multi, multi of a one-chunk document, single) under FSDP2 on one GPU, and a
plain Llama training step of as many tokens, each with FLOPs counted by torch.utils.flop_counter. It prints one JSON
line: latencies, tokens/s, MFU (against the GPU's dense bf16 peak when known) and peak memory per placement, plus
the targets and whether each was met. It needs about 75 GB of GPU memory (an 80 GB card) and 50 GB of host memory
and should take well under 8 minutes on an H100/H200.

No GPU was available where this was written: the script was run only with `--shape tiny` on CPU (tests/
test_gpu_check.py), where every path runs (FSDP2 over gloo, the decoder without a graph, host placements on the
host). Targets on H100/H200: decode <= 11 ms/token, prefill of 256 tokens <= 40 ms, each training step >= 0.5 of the
plain Llama's MFU, peak memory with the long-term memory on the host <= 22 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .bench import SHAPES, Clock, Shape, build_model, emit, environment, make_out_dir, random_ids, random_ltm
from .config import StepConfig
from .data.sample import Sample
from .model.memory import LTM_PLACEMENTS, MemoryState
from .model.mplus import MPlus
from .stages.step import MemoryStep, RevisitCache

GIB = 2 ** 30
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12, "GH200": 989e12}
"""Dense bf16 tensor-core peaks (vendor data sheets, SXM parts) by a substring of the device name."""
PLACEMENTS = LTM_PLACEMENTS
"""Placement name -> (long-term rows, long-term keys)."""
TRAINING_KINDS = ("full", "revisit", "multi", "multi_one_chunk", "single")
TARGETS = {"decode_ms_per_token": 11.0, "prefill_ms": 40.0, "training_mfu_ratio_to_plain": 0.5,
           "peak_gib_ltm_on_host": 22.0}


@dataclass(frozen=True)
class Workload:
    shape: str
    inject_tokens: int
    prompt_tokens: int
    new_tokens: int
    ltm_rows: int
    repeats: int
    train_chunks: int
    train_chunk_tokens: int
    train_target_tokens: int


WORKLOADS = {
    "8b": Workload("8b", inject_tokens=512, prompt_tokens=256, new_tokens=32, ltm_rows=150_000, repeats=3,
                   train_chunks=4, train_chunk_tokens=256, train_target_tokens=256),
    "tiny": Workload("tiny", inject_tokens=128, prompt_tokens=32, new_tokens=8, ltm_rows=1_000, repeats=1,
                     train_chunks=2, train_chunk_tokens=16, train_target_tokens=16),
}


def _num(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


class PeakMemory:
    """Peak GPU memory allocated inside the block (absolute: weights and memory included); None on CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.device, self.gib = device.type == "cuda", device, None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / GIB
        return False


def _median_time(clock: Clock, fn, repeats: int) -> float:
    return statistics.median(clock.time(fn)[0] for _ in range(repeats))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- building --------------------------------------------------------------------------------------------------------
def build(shape: Shape, work: Workload, device: torch.device, dtype: torch.dtype) -> tuple[MPlus, MemoryState]:
    """The random model (random adapters) and its memory: `inject_tokens` injected, `ltm_rows` long-term rows."""
    model = build_model(shape, device, dtype, ltm_capacity=work.ltm_rows)
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01, generator=g)
    ids_gen = torch.Generator().manual_seed(0)
    memory = model.new_memory(seed=0)
    for _ in range(max(1, work.inject_tokens // shape.chunk_tokens)):
        model.inject(memory, random_ids(shape, shape.chunk_tokens, ids_gen, device))
    ltm = memory.ltm
    ltm.reserve(work.ltm_rows)
    step = 8192
    for i, start in enumerate(range(ltm.size, work.ltm_rows, step)):   # in slices: never two copies of the store
        n = min(step, work.ltm_rows - start)
        ltm.add(*random_ltm(shape.layers, n, shape.hidden, shape.selector_width, min_age=shape.stm_rows,
                            dtype=dtype, device=device, generator_seed=i + 1))
    return model, memory


# ---- inference ----------------------------------------------------------------------------------------------------
def decode_flops_per_token(model: MPlus, context: int) -> float:
    """2 x the weights every token multiplies by, plus attention over `context` keys (QK and PV)."""
    cfg = model.llama.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weights = 0
    for layer in model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            weights += getattr(m, "base_layer", m).weight.numel()
    weights += model.llama.lm_head.weight.numel()
    return 2.0 * weights + 4.0 * len(model.layers) * cfg.num_attention_heads * head_dim * context


def decode_bytes_per_token(model: MPlus, context: int) -> float:
    """Bytes a decode step must read at least: every weight it multiplies by, and the cache's K/V."""
    cfg = model.llama.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * len(model.layers) * cfg.num_key_value_heads * head_dim * context
    return (decode_flops_per_token(model, 0) / 2 + kv) * model.dtype.itemsize


def check_placement(model: MPlus, memory: MemoryState, shape: Shape, work: Workload, device: torch.device,
                    prompt: torch.Tensor, peak: float | None) -> dict[str, Any]:
    """Prefill and decode latencies and peak GPU memory with the memory as it is placed now."""
    clock, R, new = Clock(device), work.repeats, work.new_tokens
    out: dict[str, Any] = {}
    prefill = lambda: model.read(memory, prompt, logits_to_keep=1)   # noqa: E731
    for fold in (False, True):    # unfolded first: its peak is the lower one
        model.free_decode_state()
        _free(device)
        gen = lambda n: model.generate(memory, prompt, n, eos_token_id=None, fold_adapter=fold)  # noqa: E731
        with PeakMemory(device) as pm:
            prefill(), gen(new)                                 # warm-up: K/V store, folding, graph capture
            t_prefill = _median_time(clock, prefill, R) if not fold else None
            t_one = _median_time(clock, lambda: gen(1), R)
            t_all = _median_time(clock, lambda: gen(new), R)
        decode = max(0.0, t_all - t_one) / (new - 1)
        suffix = "" if fold else "_unfolded"
        if t_prefill is not None:
            out["prefill_ms"] = _num(t_prefill * 1e3)
            out["prefill_tokens_per_s"] = _num(work.prompt_tokens / t_prefill)
        out[f"decode_ms_per_token{suffix}"] = _num(decode * 1e3)
        out[f"decode_tokens_per_s{suffix}"] = _num(1 / decode) if decode > 0 else None
        out[f"peak_gib{suffix}"] = _num(pm.gib)
    context = model.prefix_length(memory) + work.prompt_tokens + new // 2
    if peak and out["decode_ms_per_token"]:
        out["decode_mfu"] = _num(decode_flops_per_token(model, context) / (out["decode_ms_per_token"] / 1e3) / peak)
        out["decode_gb_per_s"] = _num(decode_bytes_per_token(model, context) / (out["decode_ms_per_token"] / 1e3)
                                      / 1e9)
    return out


def inference(model: MPlus, memory: MemoryState, shape: Shape, work: Workload, device: torch.device,
              placements: list[str]) -> dict[str, Any]:
    clock = Clock(device)
    ids_gen = torch.Generator().manual_seed(2)
    prompt = random_ids(shape, work.prompt_tokens, ids_gen, device)
    peak = peak_flops(device)
    model.read(memory, prompt, logits_to_keep=1)    # computes the short-term rows' K/V, kept for the next reads
    with FlopCounterMode(display=False) as counter:
        model.read(memory, prompt, logits_to_keep=1)
    prefill_flops = counter.get_total_flops()
    # the decode paths agree: folded vs unfolded vs the layer path (train mode; the shape has no LoRA dropout)
    ref = {}
    for label, fold in (("folded", True), ("unfolded", False)):
        ref[label] = model.generate(memory, prompt, work.new_tokens, eos_token_id=None, fold_adapter=fold)
    model.train()
    ref["layers"] = model.generate(memory, prompt, work.new_tokens, eos_token_id=None)
    model.eval()
    model.free_decode_state()
    n = work.prompt_tokens
    agree = {k: _num(float((v[:, n:] == ref["layers"][:, n:]).float().mean())) for k, v in ref.items() if k != "layers"}
    inject_ids = random_ids(shape, shape.chunk_tokens, ids_gen, device)
    # into the memory itself (a copy would double the long-term store on the GPU); the store is full, so it keeps
    # its size and the memory stays full
    t_inject = _median_time(clock, lambda: model.inject(memory, inject_ids), work.repeats)
    result: dict[str, Any] = {
        "inject_ms_per_chunk": _num(t_inject * 1e3), "inject_tokens_per_s": _num(shape.chunk_tokens / t_inject),
        "prefill_flops": prefill_flops, "decode_tokens_agree_with_layer_path": agree, "placements": {}}
    for name in placements:
        rows, keys = PLACEMENTS[name]
        memory.place(device, model.dtype, ltm_rows=rows, ltm_keys=keys)
        _free(device)
        res = check_placement(model, memory, shape, work, device, prompt, peak)
        if peak:
            res["prefill_mfu"] = _num(prefill_flops / (res["prefill_ms"] / 1e3) / peak)
        res["ltm_gib_on_gpu"] = _num(sum(t.numel() * t.element_size() for t in (memory.ltm.rows, memory.ltm.keys)
                                         if t.device.type == "cuda") / GIB)
        result["placements"][name] = res
    model.free_decode_state()
    return result


# ---- training -----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(work: Workload, vocab: int, chunks: int, g: torch.Generator) -> Sample:
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g)  # noqa: E731
    return Sample([ids(work.train_chunk_tokens) for _ in range(chunks)], ids(work.train_target_tokens),
                  doc_id="gpu_check")


def _set_kind(step: MemoryStep, kind: str, work: Workload, vocab: int, g: torch.Generator) -> Sample:
    """Make the next step of `step` one of `kind` (the step kinds' probabilities at 0 or 1) and its sample."""
    s = step.cfg
    s.full_context_ratio = 1.0 if kind == "full" else 0.0
    s.multi_chunk_ratio = 1.0 if kind.startswith("multi") or kind == "revisit" else 0.0
    s.revisit, s.pass_ratio = kind == "revisit", 0.0
    if kind == "revisit":
        target = torch.randint(3, vocab, (1, work.train_target_tokens), generator=g).to(step.device)
        step.revisit = RevisitCache(ids=target, mask=torch.ones_like(target, dtype=torch.bool), doc=0,
                                    chunks_since=1)
    return _sample(work, vocab, 1 if kind in ("multi_one_chunk", "single") else work.train_chunks, g)


def _timed_steps(run, clock: Clock, repeats: int, peak: float | None) -> dict[str, Any]:
    """Warm-up, one step under the FLOP counter, then `repeats` timed steps."""
    tokens = run()
    with FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()
    seconds = _median_time(clock, run, repeats)
    return {"tokens": tokens, "seconds": _num(seconds), "flops": flops, "tflops_per_s": _num(flops / seconds / 1e12),
            "tokens_per_s": _num(tokens / seconds), "mfu": _num(flops / seconds / peak) if peak else None}


class OneRank:
    """A one-process torch.distributed group (NCCL on CUDA, gloo on CPU) and its device mesh, for FSDP2."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.started = not dist.is_initialized()
        if self.started:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        self.mesh = init_device_mesh(self.device.type, (1,))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.started and dist.is_initialized():
            dist.destroy_process_group()
        return False


def training(model: MPlus, memory: MemoryState, shape: Shape, work: Workload, device: torch.device, mesh
             ) -> dict[str, Any]:
    """One optimizer step of each kind under FSDP2 (the model is sharded in place: no inference after this)."""
    from .distributed import shard_backbone

    bf16 = torch.bfloat16 if device.type == "cuda" else None
    clock, peak, vocab = Clock(device), peak_flops(device), shape.vocab
    # the long-term rows stay on the host: 8B training activations and 40 GB of rows do not share an 80 GB GPU
    memory.place(device, model.dtype, ltm_rows="host", ltm_keys="device")
    model.for_training()
    shard_backbone(model, mesh, param_dtype=bf16)
    cfg = StepConfig(retriever_loss=True, num_contexts_schedule=[[0, work.train_chunks]],
                     max_seq_length=(work.train_chunks + 1) * work.train_chunk_tokens)
    step = MemoryStep(model, cfg, memory)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    g = torch.Generator().manual_seed(3)
    kinds: dict[str, Any] = {}
    with PeakMemory(device) as pm:
        for kind in TRAINING_KINDS:
            def run(kind=kind) -> int:
                result = step.step(_set_kind(step, kind, work, vocab, g))
                if result.kind != kind.split("_")[0]:
                    raise RuntimeError(f"asked for a {kind} step, got {result.kind}")
                result.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return result.tokens
            kinds[kind] = _timed_steps(run, clock, work.repeats, peak)
    return {"kinds": kinds, "peak_gib": _num(pm.gib), "ltm_rows": "host",
            "note": "M+ steps train the adapters, BOS vectors and retrievers (backbone frozen); the plain Llama "
                    "step trains every weight (SGD, no optimizer state) on as many tokens as the longest M+ step"}


def plain_llama_step(shape: Shape, device: torch.device, mesh, tokens: int, repeats: int) -> dict[str, Any]:
    """A transformers LlamaForCausalLM of the same shape, every weight trained, under FSDP2 like the M+ model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaForCausalLM

    bf16 = torch.bfloat16 if device.type == "cuda" else None
    clock, peak = Clock(device), peak_flops(device)

    config = shape.config(ltm_capacity=shape.num_tokens).llama_config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(bf16 or torch.float32)
    try:
        with torch.device(device):
            llama = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    mp = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32)
    for layer in llama.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(llama, mesh=mesh, mp_policy=mp)
    opt = torch.optim.SGD(llama.parameters(), lr=1e-9)
    x = torch.randint(3, shape.vocab, (1, tokens), generator=torch.Generator().manual_seed(4)).to(device)

    def run() -> int:
        llama(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens

    with PeakMemory(device) as pm:
        out = _timed_steps(run, clock, repeats, peak)
    out["peak_gib"] = _num(pm.gib)
    return out


# ---- the check ----------------------------------------------------------------------------------------------------
def verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: met, missed, or None (not measured: CPU, or a part skipped)."""
    if result["device"] == "cpu":
        return {k: None for k in TARGETS}
    inf = result.get("inference", {}).get("placements", {})
    out: dict[str, bool | None] = {}
    decode = [p["decode_ms_per_token"] for p in inf.values() if p.get("decode_ms_per_token") is not None]
    out["decode_ms_per_token"] = min(decode) <= TARGETS["decode_ms_per_token"] if decode else None
    prefill = [p["prefill_ms"] for p in inf.values() if p.get("prefill_ms") is not None]
    out["prefill_ms"] = min(prefill) <= TARGETS["prefill_ms"] if prefill else None
    kinds = result.get("training", {}).get("kinds", {})
    out["training_mfu_ratio_to_plain"] = (min(k["ratio_to_plain"] for k in kinds.values())
                                          >= TARGETS["training_mfu_ratio_to_plain"]) if kinds else None
    # GB read as GiB, as torch.cuda and the paper's Table 1 (21,177.76 "MB" of max_memory_allocated) count them
    host = [p.get("peak_gib_unfolded") for n, p in inf.items() if n != "device" and p.get("peak_gib_unfolded")]
    out["peak_gib_ltm_on_host"] = min(host) <= TARGETS["peak_gib_ltm_on_host"] if host else None
    return out


def run_check(shape_name: str, device: torch.device, placements: list[str], skip_training: bool = False
              ) -> dict[str, Any]:
    started = time.perf_counter()
    work = WORKLOADS[shape_name]
    shape = dataclasses.replace(SHAPES[shape_name], chunk_tokens=min(SHAPES[shape_name].chunk_tokens,
                                                                     work.inject_tokens))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    result: dict[str, Any] = {"check": "gpu_check", "shape": shape_name, "device": str(device),
                              "dtype": str(dtype).removeprefix("torch."), "workload": dataclasses.asdict(work),
                              "environment": environment(device, torch.get_num_threads())}
    model, memory = build(shape, work, device, dtype)
    result["build_s"] = _num(time.perf_counter() - started)
    result["memory"] = {"stm_rows_per_layer": memory.size, "ltm_rows_per_layer": memory.ltm.size,
                        "prefix_rows_per_layer": model.prefix_length(memory)}
    result["inference"] = inference(model, memory, shape, work, device, placements)
    if not skip_training:
        with OneRank(device) as rank:
            train = training(model, memory, shape, work, device, rank.mesh)
            tokens = max(k["tokens"] for k in train["kinds"].values())
            del model, memory          # the plain Llama needs the room
            _free(device)
            train["plain_llama"] = plain_llama_step(shape, device, rank.mesh, tokens, work.repeats)
        for k in train["kinds"].values():
            k["ratio_to_plain"] = _num(k["tflops_per_s"] / train["plain_llama"]["tflops_per_s"])
        result["training"] = train
    result["targets"] = TARGETS
    result["met"] = verdicts(result)
    result["wall_s"] = _num(time.perf_counter() - started)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m mplus_lightning.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(WORKLOADS), default="8b")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--placements", default=",".join(PLACEMENTS),
                        help=f"comma-separated, of {list(PLACEMENTS)} (default: all)")
    parser.add_argument("--skip-training", action="store_true", help="inference only")
    parser.add_argument("--out", default=None, help="also write the JSON line here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build / on this machine")
    if args.shape == "8b" and device.type != "cuda":
        parser.error("--shape 8b needs a CUDA GPU (about 60 GB of GPU memory); on CPU use --shape tiny")
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    unknown = sorted(set(placements) - set(PLACEMENTS))
    if unknown or not placements:
        parser.error(f"--placements: unknown {unknown}; choose from {list(PLACEMENTS)}")
    if args.out:   # before minutes of GPU time, not after them
        make_out_dir(parser, args.out)
    result = run_check(args.shape, device, placements, args.skip_training)
    emit(result, args.out)   # one line
    return result


if __name__ == "__main__":
    main()
