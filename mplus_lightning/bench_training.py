"""Training-step benchmark: `python -m mplus_lightning.bench training [--shape mid] [--threads 2] [--repeats R]`.

For each step kind of the training step (full-context, revisit, multi-chunk, multi-chunk of a one-chunk document,
single-chunk) it times whole optimizer steps (forward, backward, AdamW) of the stage-3 module at the given shape, and
counts the FLOPs of every forward and backward the step runs (torch.utils.flop_counter: matmuls and attention).
Beside them, a plain transformers LlamaForCausalLM training step of the same shape on the same machine in the same
run (all weights trainable, one sequence as long as the M+ step's real tokens). Figures are achieved FLOP/s and their
ratio to the plain step's; the target is >= 0.8.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

from .config import ModelConfig, RunConfig
from .data.sample import Sample
from .stages import LtmModule
from .stages.step import RevisitCache

KINDS = ("full", "revisit", "multi", "multi_one_chunk", "single")
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


def _time(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run_training(shape, threads: int = 2, repeats: int = 3) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = _module(shape)
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(1)
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        def step(kind=kind):
            sample = _configure(module, kind, shape, g)
            result = module.memory_step.step(sample)
            assert result.kind == kind.split("_")[0], (kind, result.kind)
            result.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return result.tokens
        tokens = step()                       # warm-up; also gives the real tokens of this kind
        flops = _flops(step)
        secs = _time(step, repeats, warmup=0)
        med = statistics.median(secs)
        kinds[kind] = {"seconds": med, "seconds_all": secs, "tokens": tokens, "flops": flops,
                       "flops_per_s": flops / med, "tokens_per_s": tokens / med}

    # the plain HF Llama step, same shape, as long as the longest M+ step's tokens
    hf = LlamaForCausalLM(module.model.llama.config)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-6)
    T = max(k["tokens"] for k in kinds.values())
    x = torch.randint(3, shape.vocab, (1, T), generator=g)

    def hf_step():
        hf(input_ids=x, labels=x).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    hf_step()
    hf_flops = _flops(hf_step)
    hf_secs = _time(hf_step, repeats, warmup=0)
    hf_rate = hf_flops / statistics.median(hf_secs)
    for k in kinds.values():
        k["ratio_to_plain_llama"] = k["flops_per_s"] / hf_rate
    return {
        "shape": shape.name, "threads": threads, "repeats": repeats, "context_chunks": CONTEXT_CHUNKS,
        "chunk_tokens": shape.chunk_tokens, "target_tokens": shape.prompt_tokens, "ltm_rows": shape.ltm_rows,
        "kinds": kinds,
        "plain_llama": {"tokens": T, "seconds": statistics.median(hf_secs), "seconds_all": hf_secs,
                        "flops": hf_flops, "flops_per_s": hf_rate},
        "target": "each kind's flops_per_s >= 0.8 x plain_llama.flops_per_s",
        "torch": torch.__version__,
    }
