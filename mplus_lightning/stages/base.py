"""The shared training LightningModule: one document per step, memory as per-rank state (research/training.md §1).

Step kinds (drawn per step, official probabilities in the config):
  full     full-context LM on the document's first max_seq_length tokens against the memory; no write
  revisit  re-score a cached earlier target against the current memory; no write
  multi    inject up to `num_contexts_schedule` chunks (no gradient; one-chunk documents keep it), then read the
           target against the whole updated memory with the read adapter (+ retriever losses)
  single   inject one chunk with gradient; the target reads only [bos ; that block] with the write adapter; then
           the block is committed
Where we differ from the official code (training.md §7), each fix is named where it happens: the target of a
multi-chunk step is scored against the memory that actually results from the injection (bug 10), the revisit
counter also counts chunks when the cache is kept (bug 9), full-context steps step the scheduler (bug 8),
validation works on a copy of the memory (bug 24), the learning rate does not scale with the GPU count (bug 17).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..config import RunConfig
from ..model import MemoryState, MPlus
from ..model.adapters import WRITE
from ..model.mplus import RetrieverProbe
from ..model.retriever import retriever_bce_loss
from .build import build_model, initial_memory

log = logging.getLogger(__name__)
RANK_STATE_SUFFIX = ".rank{rank}.state"
RECENT_DOCS = 64
OTHER_CHUNK = -3
"""Row stamp of a chunk written by the current sample that its question is not about (-1: never written; -2:
validation)."""


def rank_state_path(ckpt_path: str | Path, rank: int) -> Path:
    """Each rank's memory and step state live beside the Lightning checkpoint (they differ per rank)."""
    return Path(str(ckpt_path) + RANK_STATE_SUFFIX.format(rank=rank))


@dataclass
class RevisitCache:
    """A target kept to be re-read later against a memory that has moved on (official `cache_data_for_longer_context`)."""

    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    doc: int = -1
    chunks_since: int = 0
    last_step_was_revisit: bool = False
    query_tokens: int | None = None
    """The retriever query length of its sample (`_retrieval_labels`), if the data gave one."""


@dataclass
class StepResult:
    loss: torch.Tensor
    """What is optimised: the LM loss plus (multi-chunk and revisit steps of stages 2-3) the retriever losses."""
    lm_loss: torch.Tensor
    kind: str
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingRecipe:
    """What every stage's LightningModule shares: the stage check, FSDP2 sharding, the optimizer and schedule,
    clipping, the model config in checkpoints, the stop on a non-finite loss. Mixed into modules that own `cfg`
    (RunConfig) and `model` (MPlus)."""

    cfg: RunConfig
    model: MPlus
    stage: str

    def check_stage(self, cfg: RunConfig) -> None:
        if cfg.stage != self.stage:
            raise ValueError(f"{type(self).__name__} trains {self.stage}, config says stage={cfg.stage}")

    def configure_optimizers(self):
        o = self.cfg.optim
        main = [p for n, p in self.model.named_parameters() if p.requires_grad and "retriever" not in n]
        selector = [p for n, p in self.model.named_parameters() if p.requires_grad and "retriever" in n]
        groups = [{"params": main, "lr": o.lr, "name": "main"}]
        if selector:
            groups.append({"params": selector, "lr": o.selector_lr, "name": "selector"})
        opt = torch.optim.AdamW(groups, weight_decay=o.weight_decay, betas=tuple(o.betas))
        if o.schedule == "constant" and o.warmup_steps == 0:
            return opt

        def factor(step: int) -> float:
            warmup = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
            if o.schedule == "constant":
                return warmup
            return warmup * (1.0 - (1.0 - o.final_lr_factor) * min(step, o.decay_steps) / max(1, o.decay_steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor] * len(groups))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.cfg.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")

    def configure_model(self) -> None:
        """FSDP2: shard each decoder layer, then the root (ModelParallelStrategy); activation checkpointing per layer
        on request. The adapter is a forward argument of each layer, so recomputation uses the right one."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from ..distributed import checkpoint_layers, shard_backbone

        if getattr(self, "_configured", False):
            return
        self._configured = True
        ac = self.cfg.trainer.activation_checkpointing
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            param_dtype = torch.bfloat16 if self.cfg.trainer.precision.startswith("bf16") else None
            shard_backbone(self.model, self.device_mesh["data_parallel"], param_dtype=param_dtype,
                           activation_checkpointing=ac)
        elif ac:
            checkpoint_layers(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The model's config travels in the checkpoint, so `python -m mplus_lightning.export` needs nothing else."""
        checkpoint["mplus_config"] = self.model.config.to_dict()

    def count_samples(self, n: int) -> None:
        """Advance the data position (saved in checkpoints) in the training step, not in on_train_batch_end:
        ModelCheckpoint saves in its own on_train_batch_end, which Lightning calls before the module's."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "samples_consumed"):
            dm.samples_consumed += n

    def _start_clock(self) -> None:
        if getattr(self, "_t0", None) is None:
            self._t0 = time.perf_counter()

    def _lap(self) -> float:
        """Seconds since the previous step ended (for train/tokens_per_s)."""
        now = time.perf_counter()
        elapsed, self._t0 = now - self._t0, now
        return elapsed

    def _agree_max(self, value: int) -> int:
        """The largest `value` over all ranks (1 process: `value`)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return value
        t = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def stop_if_not_finite(self, loss: torch.Tensor, what: str) -> None:
        """Every rank stops together on a non-finite loss, with the step and what was being trained."""
        if self._agree_max(int(not torch.isfinite(loss))):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()} on rank {self.global_rank}) at step {self.global_step} "
                f"({what}): stopping. Nothing was saved after the last good checkpoint; resume from it with a lower "
                "learning rate (optim.lr) or check the data.")


class MemoryTrainingModule(TrainingRecipe, L.LightningModule):
    """Shared logic of the three memory stages. Subclasses only check their stage's requirements."""

    stage = "stage1"

    def __init__(self, cfg: RunConfig, instruction_ids: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.check_stage(cfg)
        self.model: MPlus = build_model(cfg)
        self.instruction_ids = list(instruction_ids or [])
        self.memory: MemoryState | None = None
        # Which document wrote each short-term slot: the retriever's labels follow rows through evictions for free.
        self.row_doc: torch.Tensor | None = None
        self.revisit = RevisitCache()
        self.docs_seen = 0
        self.recent_docs: list[str] = []   # doc ids of the last RECENT_DOCS steps of this rank (saved in checkpoints)
        self.rng = random.Random(cfg.trainer.seed)        # step decisions: the same on every rank (see run_step)
        self.rank_rng = random.Random(cfg.trainer.seed)   # per-rank draws that trigger no collective
        self.evict_gen = torch.Generator().manual_seed(cfg.trainer.seed)

    # ---- memory lifecycle ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        # Step kinds are drawn identically on every rank: under FSDP each layer forward is a collective, so all ranks
        # must run the same sequence of passes. Each rank has its own documents, memory and eviction draws.
        self.rng = random.Random(f"{self.cfg.trainer.seed}:steps")
        self.rank_rng = random.Random(f"{self.cfg.trainer.seed}:{rank}")
        self.evict_gen = torch.Generator().manual_seed(self.cfg.trainer.seed * 1000 + rank)

    def on_fit_start(self) -> None:
        if self.memory is None:
            self.memory = initial_memory(self.cfg, self.model, seed=self.cfg.trainer.seed + self.global_rank)
        self.memory.to(device=self.device, dtype=self.memory_dtype)
        if self.row_doc is None:
            self.row_doc = torch.full(self.memory.ranks.shape, -1, dtype=torch.long)
        self.row_doc = self.row_doc.to(self.device)

    @property
    def memory_dtype(self) -> torch.dtype:
        """bf16 under bf16 precisions (the official pool and long-term memory were bf16: ~40 GB per rank at 8B size
        instead of 80), else the weights' dtype."""
        return torch.bfloat16 if self.cfg.trainer.precision.startswith("bf16") else self.model.dtype

    def _keys(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model("keys", rows)

    def _commit(self, delta: torch.Tensor, doc: int | list[int], memory: MemoryState | None = None,
                row_doc: torch.Tensor | None = None) -> torch.Tensor:
        """Commit delta into memory (training memory unless given); stamp the new slots with `doc` (one id, or one
        per new row: K ids in the order of delta's rows). Returns the new slots [L, K] in delta's row order."""
        memory = memory if memory is not None else self.memory
        row_doc = row_doc if row_doc is not None else self.row_doc
        memory.commit(delta.detach(), keys_fn=self._keys if memory.ltm is not None else None,
                      generator=self.evict_gen, per_layer=self.model.config.drop_memory_per_layer)
        slots = memory.slots_in_rank_order()[:, -memory.num_tokens:]
        if isinstance(doc, int):
            row_doc.scatter_(1, slots, doc)
        else:
            row_doc.scatter_(1, slots, torch.tensor(doc, device=row_doc.device).expand_as(slots))
        return slots

    def _inject_no_grad(self, chunks: list[torch.Tensor], doc: int | list, memory=None, row_doc=None) -> None:
        """Inject chunks one by one without gradient, stamping their rows with `doc` (or one stamp per chunk). Ranks
        with fewer chunks than the most any rank has run the same passes on a stand-in chunk and discard them, so
        every rank issues the same FSDP collectives."""
        memory = memory if memory is not None else self.memory
        docs = doc if isinstance(doc, list) else [doc] * len(chunks)
        n = self._agree_max(len(chunks))
        for i in range(n):
            real = i < len(chunks)
            chunk = chunks[i] if real else torch.full((self.memory.num_tokens,), 3, dtype=torch.long)
            with torch.no_grad():
                delta = self.model("write", chunk[None].to(self.device), memory.newest_block())
                if real:
                    self._commit(delta, docs[i], memory, row_doc)
                elif memory.ltm is not None and memory.initialized:
                    self._keys(delta.new_zeros(delta.shape))  # the commit's key pass

    # ---- the step ---------------------------------------------------------------------------------------------
    def num_contexts(self, step: int) -> int:
        n = self.cfg.step.num_contexts_schedule[0][1]
        for start, value in self.cfg.step.num_contexts_schedule:
            if step >= start:
                n = value
        return n

    def _target(self, sample, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence to predict and its loss mask. Repeat task: instruction + the injected text, with the
        instruction and `mask_extra_tokens` more positions masked (built from ids: no decode/re-tokenize)."""
        S = self.cfg.step.max_seq_length
        if sample.repeat:
            # on the chunks' device: the batch was already moved to the GPU (this was a CPU tensor: a crash on cuda)
            instr = torch.tensor(self.instruction_ids, dtype=torch.long, device=chunks[0].device)
            body = torch.cat(chunks)[: S - len(instr)]
            ids = torch.cat([instr, body])
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[: len(instr) + self.cfg.step.mask_extra_tokens] = False
        else:
            ids = sample.target[:S]
            given = getattr(sample, "target_mask", None)
            mask = given[:S].bool() if given is not None else torch.ones_like(ids, dtype=torch.bool)
        return ids[None].to(self.device), mask[None].to(self.device)

    def _probe(self, target_len: int, encoder: bool, query_tokens: int | None = None) -> RetrieverProbe | None:
        """The retriever's training probe: queries from a prefix of the target (`query_tokens` long when the data
        says which tokens ask, else a random length per layer, as official, or the whole target)."""
        s = self.cfg.step
        if not s.retriever_loss:
            return None
        L = self.model.config.num_layers
        if query_tokens:
            lengths = [min(query_tokens, target_len)] * L
        elif s.random_retriever_length:
            lengths = [self.rank_rng.randint(1, max(1, target_len - 1)) for _ in range(L)]
        else:
            lengths = [target_len] * L
        enc = None
        if encoder and s.encoder_retriever_loss and self.model.config.add_encoder_retriever:
            enc = torch.argsort(self.memory.ranks, dim=1)[:, -self.memory.num_tokens:]  # newest block, per layer
        return RetrieverProbe(lengths=lengths, encoder_queries=enc)

    def _retriever_losses(self, probe: RetrieverProbe | None, positives: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if probe is None or not probe.scores:
            return torch.zeros((), device=self.device), {}
        w = torch.stack(probe.scores)                                      # [L, N]
        loss = retriever_bce_loss(w, positives, self.cfg.step.negative_loss_weight)
        picked = w.detach() > 0.5
        tp = (picked & positives).sum().item()
        metrics = {"retriever_loss": loss.item(),
                   "retriever_precision": tp / max(1, picked.sum().item()),
                   "retriever_recall": tp / max(1, positives.sum().item())}
        if probe.encoder_scores:
            enc = retriever_bce_loss(torch.stack(probe.encoder_scores), positives, self.cfg.step.negative_loss_weight)
            metrics["retriever_encoder_loss"] = enc.item()
            loss = loss + enc
        return loss, metrics

    def run_step(self, sample) -> StepResult:
        cfg, model, memory = self.cfg.step, self.model, self.memory
        doc = self.docs_seen
        self.docs_seen += 1
        self.recent_docs = (self.recent_docs + [str(sample.doc_id)])[-RECENT_DOCS:]
        contexts = [c.long() for c in sample.contexts]
        if not contexts:
            raise ValueError(f"training sample {sample.doc_id!r} has no context chunk (the data should reject it)")
        r = self.rng.random()
        if r < cfg.full_context_ratio:
            # Full-context LM: the document's first tokens read against the memory; nothing is written.
            seq = sample.target if sample.repeat else torch.cat(contexts + [sample.target])
            ids = seq[: cfg.max_seq_length][None].to(self.device)
            loss, n = model("lm_loss", ids, torch.ones_like(ids, dtype=torch.bool), model.view(memory))
            return StepResult(loss, loss, "full", ids.shape[1])

        c = self.revisit
        multi = self.rng.random() < cfg.multi_chunk_ratio
        if (cfg.revisit and not c.last_step_was_revisit and c.ids is not None and c.chunks_since > 0
                and self.rng.random() >= cfg.pass_ratio):
            # Revisit: the document fetched for this step is not used (as official); its target waits in no cache.
            probe = self._probe(c.ids.shape[1], encoder=False, query_tokens=c.query_tokens) if multi else None
            loss, n = model("lm_loss", c.ids, c.mask, model.view(memory), probe=probe)
            r_loss, metrics = self._retriever_losses(probe, self.row_doc == c.doc)
            c.last_step_was_revisit = True
            metrics["revisit_distance_chunks"] = c.chunks_since
            return StepResult(loss + r_loss, loss, "revisit", c.ids.shape[1], metrics)

        n_chunks = self._agree_max(min(self.num_contexts(self.global_step), len(contexts))) if multi else 1
        chunks = contexts[:n_chunks] if sample.repeat else contexts[-n_chunks:]   # fewer if this document is short
        ids, mask = self._target(sample, chunks)
        tokens = ids.shape[1] + sum(len(x) for x in chunks)
        metrics: dict[str, Any] = {"num_contexts": n_chunks}
        docs, query_tokens = self._retrieval_labels(sample, len(contexts), n_chunks, doc)
        if multi:
            if n_chunks == 1 and cfg.single_chunk_gradient:
                delta = model("write", chunks[0][None].to(self.device), memory.newest_block())
                slots = self._commit(delta, docs[0])
                # The committed rows, with the new block carrying its gradient back into the write pass.
                rows = memory.rows.detach().clone()
                rows.scatter_(1, slots[..., None].expand(-1, -1, rows.shape[2]), delta)
                view = model.view(memory)
                view.rows = rows
            else:
                self._inject_no_grad(chunks, docs)
                view = model.view(memory)
            probe = self._probe(ids.shape[1], encoder=True, query_tokens=query_tokens)
            loss, n = model("lm_loss", ids, mask, view, probe=probe)
            r_loss, r_metrics = self._retriever_losses(probe, self.row_doc == doc)
            metrics.update(r_metrics)
            total = loss + r_loss
            kind = "multi"
        else:
            delta = model("write", chunks[0][None].to(self.device), memory.newest_block())
            loss, n = model("lm_loss", ids, mask, model.delta_view(delta, WRITE))
            self._commit(delta, docs[0])
            total, kind = loss, "single"
        self._update_revisit_cache(ids, mask, doc, n_chunks, query_tokens)
        return StepResult(total, loss, kind, tokens, metrics)

    def _retrieval_labels(self, sample, n_contexts: int, n_chunks: int, doc: int
                          ) -> tuple[list[int | list[int]], int | None]:
        """Per injected chunk, the stamp of its rows (the retriever's positives are the rows stamped `doc`): one id
        for all its rows, or K ids, one per row. Also the retriever query length. Documents: every chunk is `doc`
        (the official labels: the rows this document wrote). Facts samples name the chunk their first question asks
        about (`Sample.retrieval_chunk`) and the token positions in it that answer (`retrieval_positions`): only the
        rows written at those tokens are positives, every other row of the sample is stamped OTHER_CHUNK, and the
        query is that question's prompt. Labels of "every fact this sample wrote" cannot be learnt from a question
        about one person, and of the asked fact's six rows the reader needs the answer's."""
        asked = sample.retrieval_chunk
        first = n_contexts - n_chunks                      # the injected chunks are the last n_chunks contexts
        if asked is None or not first <= asked < n_contexts:   # (repeat samples carry none: about every fact)
            return [doc] * n_chunks, None
        stamps: list[int | list[int]] = [OTHER_CHUNK] * n_chunks
        stamps[asked - first] = self._row_stamps(len(sample.contexts[asked]), sample.retrieval_positions, doc)
        return stamps, sample.retrieval_query_tokens

    def _row_stamps(self, chunk_len: int, positions: list[int] | None, doc: int) -> int | list[int]:
        """Stamps of the K rows a chunk of `chunk_len` tokens writes: `doc` on the rows written at `positions`.
        Row r is the write pass's output at chunk token chunk_len - K + r (shorter chunks: the first rows are
        re-processed old rows, never positives). No positions, or none among the rows: every row is `doc`."""
        if positions is None:
            return doc
        K = self.model.config.num_tokens
        stamps = [doc if chunk_len - K + r in positions else OTHER_CHUNK for r in range(K)]
        return stamps if doc in stamps else doc

    def _update_revisit_cache(self, ids, mask, doc, n_chunks, query_tokens: int | None = None) -> None:
        c = self.revisit
        if c.ids is None or (c.last_step_was_revisit and self.rng.random() < self.cfg.step.empty_prob):
            c.ids, c.mask, c.doc, c.chunks_since, c.query_tokens = ids.detach(), mask, doc, 0, query_tokens
        else:
            c.chunks_since += n_chunks  # official bug 9: it skipped this when the cache was kept after a revisit
        c.last_step_was_revisit = False

    # ---- Lightning hooks ------------------------------------------------------------------------------------
    def training_step(self, sample, batch_idx):
        self._start_clock()
        result = self.run_step(sample)
        self.stop_if_not_finite(result.loss, f"{result.kind} step, document {getattr(sample, 'doc_id', '?')}")
        self.count_samples(1)
        elapsed = self._lap()
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        self.log("train/loss", result.loss, prog_bar=True, **log)
        self.log("train/lm_loss", result.lm_loss, **log)
        self.log(f"train/lm_loss_{result.kind}", result.lm_loss, **log)
        self.log("train/tokens_per_s", result.tokens / max(elapsed, 1e-9), prog_bar=True, **log)
        for k, v in result.metrics.items():
            self.log(f"train/{k}", float(v), **log)
        if self.memory.ltm is not None:
            self.log("ltm/size", float(len(self.memory.ltm)), **log)
        return result.loss

    def validation_step(self, sample, batch_idx):
        """Held-out LM loss and next-token accuracy of the target after injecting its contexts into a *copy* of the
        training memory (official bug 24: validation wrote into the live memory)."""
        memory = self.memory.clone()
        row_doc = self.row_doc.clone()
        contexts = [c.long() for c in sample.contexts][-self.num_contexts(self.global_step):]
        self._inject_no_grad(contexts, -2, memory, row_doc)
        ids, mask = self._target(sample, contexts)
        with torch.no_grad():
            loss, count, hits = self.model("lm_loss", ids, mask, self.model.view(memory), with_accuracy=True)
        hit = hits.float() / count.clamp(min=1)
        self.log("val/loss", loss, batch_size=1, sync_dist=True)
        self.log("val/token_acc", hit, batch_size=1, sync_dist=True)

    # ---- per-rank state in checkpoints -------------------------------------------------------------------
    def rank_state(self) -> dict:
        c = self.revisit
        return {
            "memory": self.memory.state_dict(), "memory_meta": self.memory.meta(),
            "row_doc": self.row_doc.cpu(), "docs_seen": self.docs_seen, "recent_docs": list(self.recent_docs),
            "revisit": {"ids": None if c.ids is None else c.ids.cpu(), "mask": None if c.mask is None else c.mask.cpu(),
                        "doc": c.doc, "chunks_since": c.chunks_since, "last": c.last_step_was_revisit,
                        "query_tokens": c.query_tokens},
            "rng": self.rng.getstate(), "rank_rng": self.rank_rng.getstate(), "evict_gen": self.evict_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "world_size": self.trainer.world_size,
        }

    def save_rank_state(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.rank_state(), tmp)
        tmp.replace(path)  # atomic: an interrupted save never leaves a half-written state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Load this rank's memory and step state from beside the checkpoint.

        Another world size than at save time: new rank r continues the state of saved rank r % saved_world_size
        (memories are duplicated when growing, the surplus ones dropped when shrinking), and the log says so.
        """
        ckpt_path = self.trainer.ckpt_path if self._trainer is not None else None
        if ckpt_path is None:
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        saved = sorted(Path(str(ckpt_path)).parent.glob(Path(str(ckpt_path)).name + ".rank*.state"))
        if not saved:
            raise FileNotFoundError(
                f"no memory state beside {ckpt_path}: every rank's memory is saved as "
                f"<ckpt>{RANK_STATE_SUFFIX.format(rank='<r>')}; was this checkpoint written by mplus_lightning?")
        source = rank % len(saved)
        if len(saved) != world:
            log.warning("resuming a checkpoint saved by %d ranks on %d ranks: rank %d continues the memory and "
                        "step state of saved rank %d", len(saved), world, rank, source)
        path = rank_state_path(ckpt_path, source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (found {[p.name for p in saved]})")
        # Applied now: Lightning calls this hook after on_fit_start when the strategy restores after setup (FSDP2).
        self._restore_rank_state(torch.load(path, weights_only=False, map_location="cpu"))

    def _restore_rank_state(self, s: dict) -> None:
        self.memory = MemoryState.from_state_dict(s["memory"], s["memory_meta"]).to(self.device, self.memory_dtype)
        self.row_doc = s["row_doc"].to(self.device)
        self.docs_seen = s["docs_seen"]
        self.recent_docs = list(s.get("recent_docs", []))
        r = s["revisit"]
        self.revisit = RevisitCache(
            ids=None if r["ids"] is None else r["ids"].to(self.device),
            mask=None if r["mask"] is None else r["mask"].to(self.device),
            doc=r["doc"], chunks_since=r["chunks_since"], last_step_was_revisit=r["last"],
            query_tokens=r.get("query_tokens"))
        self.rng.setstate(s["rng"])
        self.rank_rng.setstate(s["rank_rng"])
        self.evict_gen.set_state(s["evict_gen"])
        torch.set_rng_state(s["torch_rng"])

