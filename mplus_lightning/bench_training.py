"""Training-step benchmark: `python -m mplus_lightning.bench training [--shape mid] [--threads 2] [--repeats R]`.

For each step kind of the training step (full-context, revisit, multi-chunk, multi-chunk of a one-chunk document,
single-chunk) it times whole optimizer steps (forward, backward, AdamW) of the stage-3 module at the given shape, and
counts the FLOPs of every forward and backward the step runs (torch.utils.flop_counter). Beside each kind, a plain
transformers LlamaForCausalLM training step of the same shape (all weights trainable, one sequence of as many tokens
as the kind's step) is timed in alternation with it, so that the machine's load hits both alike (`plain_llama` of the
kind). Figures are achieved FLOP/s and their ratio to the plain step's (`ratio_to_plain_llama`); the target is >= 0.8.
A third step, `lora_llama`, trains the same Llama as M+ trains its backbone: frozen, with one LoRA adapter of M+'s
rank and targets (`ratio_to_lora_llama`). It separates what the memory costs from what LoRA-only training costs:
the plain step's rate includes the weight-gradient matmuls (large and efficient), which a LoRA step does not run.
Timings are medians of the repeats; the bench command adds the load average before and after and the thread
settings of the environment (`env`) to the JSON. Those move the ratios: an M+ step runs 4-6x the ops of the plain
step (torch.profiler events), most of them small, so it pays more for each wake-up of a sleeping OpenMP thread (~70
us here with OMP_WAIT_POLICY=PASSIVE, against ~5 us for a 256x256 add). Measured at mid shape, 2 threads, three
rounds of each setting in alternation on an otherwise idle 2-core Intel Xeon, ratio with attention (full / revisit /
multi / one-chunk / single) to the plain step, then to the LoRA step. The first row is the M+ step of 32903e1, timed in
alternation with 189a7bc's (whose cache concatenated the tokens' K/V to the prefix's): its multi, one-chunk and
single-chunk steps took 2-8% less time, full and revisit the same within noise, and the ratios of both overlap, as
the baselines moved as much between rounds. The other rows are 189a7bc's M+ step:
    GOMP_SPINCOUNT=10000 (make bench)  plain 0.90-0.91 / 0.81-0.92 / 0.62-0.64 / 0.69-0.71 / 0.55-0.60
                                       LoRA  1.09-1.12 / 0.98-1.11 / 0.72-0.75 / 0.83-0.86 / 0.68-0.69
    the same, 189a7bc's M+ step        plain 0.84-0.89 / 0.86-0.88 / 0.63-0.66 / 0.68-0.70 / 0.58-0.60
                                       LoRA  1.04-1.11 / 1.02-1.05 / 0.72-0.76 / 0.83-0.85 / 0.71-0.75
    OMP_WAIT_POLICY=PASSIVE            plain 0.92-0.96 / 1.00-1.03 / 0.45-0.49 / 0.65-0.66 / 0.45-0.46
                                       LoRA  1.11-1.21 / 1.30-1.33 / 0.53-0.57 / 0.81-0.86 / 0.58-0.60
    default (spins for milliseconds)   plain 0.82-0.89 / 0.88-0.89 / 0.66-0.68 / 0.71 / 0.60-0.63 (no LoRA step yet)
    --threads 1 (two rounds)           plain 0.92-0.93 / 0.91 / 0.79-0.81 / 0.80-0.81 / 0.70-0.71
                                       LoRA  1.08-1.10 / 1.00-1.02 / 0.88-0.90 / 0.93-0.94 / 0.81-0.83
From one thread to two the M+ steps gain less than the plain one (multi 0.69 -> 0.47 s, plain 0.79 -> 0.44 s): their
many small ops split poorly over threads.
The single-chunk step (512 tokens: a 256-token write, then a 256-token read) took 0.18-0.20 s spinning and 0.36-0.37
s with PASSIVE; the plain step 0.16-0.18 / 0.24-0.25 s (21.0 GFLOP without attention), the LoRA step 0.15-0.16 /
0.23-0.24 s (14.7 GFLOP; M+ 14.0). Run with its LoRA-wrapped linears as their base linears (an experiment), the
single-chunk M+ step took 0.14 s instead of 0.19 and multi 0.42 s instead of 0.47-0.50: the rank-8 matmuls are little
work in many calls, and M+ makes twice the layer passes of a plain step of as many tokens.

torch's counter has no formula for the CPU attention kernels, so `flops` holds the matmuls only (on CPU: projections,
MLP, LoRA, lm_head, retrieval scores), and an M+ step's attention over thousands of memory keys is time without FLOPs.
`attention_flops` counts those kernels' work, per score a query sees (bottom-right causal over prefix + tokens, causal
for the plain step; 4 FLOPs per score and head dimension forward, 8 backward, as torch counts SDPA on GPU), and
`ratio_with_attention_to_plain_llama` compares the rates with it on both sides.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

from .config import ModelConfig, RunConfig
from .data.sample import Sample
from .model.adapters import WRITE, activate, add_lora_adapters, lora_modules
from .stages import LtmModule
from .stages.step import RevisitCache

KINDS = ("full", "revisit", "multi", "multi_one_chunk", "single")
TARGET_RATIO = 0.8
"""Each kind's FLOP/s (attention included) against the plain step's: the target of the benchmark."""
CONTEXT_CHUNKS = 4


def _module(shape, seed: int = 0) -> LtmModule:
    mc = shape.config(ltm_capacity=shape.ltm_rows + 64 * shape.num_tokens)
    # The stage-3 step also trains the encoder retriever, which the inference shapes leave out.
    model = ModelConfig(init="tiny", llama=mc.llama, **{**mc.architecture_fields(), "add_encoder_retriever": True})
    cfg = RunConfig(name="bench", stage="ltm", model=model)
    cfg.step.retriever_loss = True
    cfg.step.num_contexts_schedule = [[0, CONTEXT_CHUNKS]]
    cfg.step.max_seq_length = 4 * shape.chunk_tokens
    cfg.trainer.seed = seed
    module = LtmModule(cfg, [3, 4])
    g = torch.Generator().manual_seed(seed)
    module.memory = module.model.new_memory(seed=seed)
    chunk = lambda: torch.randint(3, shape.vocab, (1, shape.chunk_tokens), generator=g)  # noqa: E731
    for _ in range(2):
        module.model.inject(module.memory, chunk(), generator=g)
    L, d, s = shape.layers, shape.hidden, shape.selector_width
    module.memory.ltm.add(torch.randn(L, shape.ltm_rows, d, generator=g) * 0.02,
                          torch.randn(L, shape.ltm_rows, s, generator=g),
                          torch.randint(0, 10 ** 6, (L, shape.ltm_rows), generator=g))
    return module


def _sample(shape, chunks: int, g: torch.Generator) -> Sample:
    ids = lambda n: torch.randint(3, shape.vocab, (n,), generator=g)  # noqa: E731
    return Sample([ids(shape.chunk_tokens) for _ in range(chunks)], ids(shape.prompt_tokens), doc_id="bench")


def _configure(module: LtmModule, kind: str, shape, g: torch.Generator) -> Sample:
    s = module.cfg.step
    s.full_context_ratio = 1.0 if kind == "full" else 0.0
    s.multi_chunk_ratio = 1.0 if kind.startswith("multi") or kind == "revisit" else 0.0
    s.revisit, s.pass_ratio = kind == "revisit", 0.0
    if kind == "revisit":
        target = torch.randint(3, shape.vocab, (1, shape.prompt_tokens), generator=g)
        module.memory_step.revisit = RevisitCache(ids=target, mask=torch.ones_like(target, dtype=torch.bool), doc=0,
                                                  chunks_since=1)
    return _sample(shape, 1 if kind in ("multi_one_chunk", "single") else CONTEXT_CHUNKS, g)


def _lora_llama(module: LtmModule) -> LlamaForCausalLM:
    """A transformers Llama of the module's shape trained as M+ trains its backbone: frozen, one LoRA adapter of the
    module's rank, scale and target projections (the same `AddmmLoraLinear` path), only the adapter trainable."""
    config = module.model.config
    llama = LlamaForCausalLM(module.model.llama.config)
    add_lora_adapters(llama.model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                      targets=config.lora_targets, names=(WRITE,))
    for name, p in llama.named_parameters():
        p.requires_grad_("lora_" in name)
    activate(lora_modules(llama), WRITE)
    return llama


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The benchmark's optimizer, the same for every step timed: AdamW over what `model` trains."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)


def training_setup(shape, seed: int = 0) -> tuple[LtmModule, torch.optim.Optimizer]:
    """The stage-3 module of the benchmark (memory filled, long-term rows added) and an AdamW over what it trains."""
    module = _module(shape, seed)
    return module, _adamw(module.model)


def training_step(module: LtmModule, opt: torch.optim.Optimizer, kind: str, shape, g: torch.Generator) -> int:
    """One optimizer step of `kind` (forward, backward, AdamW) on a fresh random sample; returns its real tokens."""
    sample = _configure(module, kind, shape, g)
    result = module.memory_step.step(sample)
    assert result.kind == kind.split("_")[0], (kind, result.kind)
    result.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return result.tokens


def _llama_step(llama: LlamaForCausalLM, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    """One optimizer step of a transformers Llama, next-token loss on `ids` [1, n]."""
    llama(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _time(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _visible_scores(query: torch.Tensor, key: torch.Tensor, is_causal: bool, attn_mask) -> int:
    """Scores of a CPU attention call that a query sees: all, top-left causal, or those its mask leaves visible."""
    B, H, n, _ = query.shape
    S = key.shape[2]
    if attn_mask is not None:
        visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
        return int(visible.expand(B, H, n, S).sum())
    if is_causal:   # row i sees keys 0 .. i
        return B * H * (min(n, S) * (min(n, S) + 1) // 2 + max(0, n - S) * S)
    return B * H * n * S


def _cpu_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None,
                         out_val=None) -> int:
    return 4 * query.shape[-1] * _visible_scores(query, key, is_causal, attn_mask)


def _cpu_attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *,
                                  attn_mask=None, scale=None, out_val=None) -> int:
    return 8 * query.shape[-1] * _visible_scores(query, key, is_causal, attn_mask)


_cpu_attention_flops._get_raw = True              # FlopCounterMode passes these the tensors, not their shapes
_cpu_attention_backward_flops._get_raw = True
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def _flops(fn) -> tuple[int, int]:
    """(FLOPs torch's counter counts, FLOPs of the CPU attention kernels it does not) of one call of fn."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    per_op = counter.get_flop_counts()["Global"]
    attention = sum(per_op.get(op, 0) for op in CPU_ATTENTION_FLOPS)
    return int(counter.get_total_flops()) - attention, int(attention)


def _rate(tokens: int, flops: int, attention_flops: int, secs: list[float]) -> dict[str, Any]:
    med = statistics.median(secs)
    return {"tokens": tokens, "seconds": med, "seconds_all": secs, "tokens_per_s": tokens / med, "flops": flops,
            "flops_per_s": flops / med, "attention_flops": attention_flops,
            "flops_per_s_with_attention": (flops + attention_flops) / med}


def run_training(shape, threads: int = 2, repeats: int = 3) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module, opt = training_setup(shape)
    g = torch.Generator().manual_seed(1)
    # The plain step: a transformers Llama of the same shape, all weights trainable, one sequence as long as the
    # kind's real tokens (a GEMM's rate grows with its rows: a longer plain step would flatter the plain side); and the
    # same Llama trained as M+ trains its backbone (frozen, LoRA).
    baselines = {name: (llama, _adamw(llama)) for name, llama in
                 (("plain_llama", LlamaForCausalLM(module.model.llama.config)), ("lora_llama", _lora_llama(module)))}
    baseline_flops: dict[tuple[str, int], tuple[int, int]] = {}
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        step = functools.partial(training_step, module, opt, kind, shape, g)
        tokens = step()                       # warm-up; also gives the real tokens of this kind
        x = torch.randint(3, shape.vocab, (1, tokens), generator=g)

        steps = {name: functools.partial(_llama_step, llama, llama_opt, x)
                 for name, (llama, llama_opt) in baselines.items()}
        for fn in steps.values():
            fn()                              # warm-up
        flops, attention_flops = _flops(step)
        for name, fn in steps.items():
            if (name, tokens) not in baseline_flops:
                baseline_flops[name, tokens] = _flops(fn)
        # side by side: the steps alternate, so that a change in the machine's load hits all alike
        secs, baseline_secs = [], {name: [] for name in steps}
        for _ in range(repeats):
            secs += _time(step, 1, warmup=0)
            for name, fn in steps.items():
                baseline_secs[name] += _time(fn, 1, warmup=0)
        k = kinds[kind] = _rate(tokens, flops, attention_flops, secs)
        for name in steps:
            b = k[name] = _rate(tokens, *baseline_flops[name, tokens], baseline_secs[name])
            k[f"ratio_to_{name}"] = k["flops_per_s"] / b["flops_per_s"]
            k[f"ratio_with_attention_to_{name}"] = k["flops_per_s_with_attention"] / b["flops_per_s_with_attention"]
    return {
        "shape": shape.name, "threads": threads, "repeats": repeats, "context_chunks": CONTEXT_CHUNKS,
        "chunk_tokens": shape.chunk_tokens, "target_tokens": shape.prompt_tokens, "ltm_rows": shape.ltm_rows,
        "kinds": kinds,
        "target": f"each kind's flops_per_s_with_attention >= {TARGET_RATIO} x its plain_llama's",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }


def summary(result: dict[str, Any]) -> str:
    """A few lines for a person: per kind the step times, both ratios (attention included) and the target's verdict."""
    lines = [f"{'kind':16s} {'M+ s':>7s} {'plain s':>8s} {'LoRA s':>7s} {'vs plain':>9s} {'vs LoRA':>8s}  "
             f"target (>= {TARGET_RATIO} vs plain)"]
    for name, k in result["kinds"].items():
        ratio = k["ratio_with_attention_to_plain_llama"]
        lines.append(f"{name:16s} {k['seconds']:7.3f} {k['plain_llama']['seconds']:8.3f} "
                     f"{k['lora_llama']['seconds']:7.3f} {ratio:9.2f} {k['ratio_with_attention_to_lora_llama']:8.2f}  "
                     + ("met" if ratio >= TARGET_RATIO else "NOT met"))
    env = result.get("env", {})
    # GOMP_SPINCOUNT, when set, decides the spin whatever the policy says (as bench.busy_machine_warning reads it)
    if result.get("threads", 1) > 1 and env.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" \
            and "GOMP_SPINCOUNT" not in env:
        lines.append("note: OMP_WAIT_POLICY=PASSIVE wakes a sleeping thread for every parallel op, which the M+ steps' "
                     "many small ops pay more than the plain step (module docstring); make bench spins briefly "
                     "instead (GOMP_SPINCOUNT=10000)")
    return "\n".join(lines)

