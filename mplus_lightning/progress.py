"""What a run shows while it trains: the scalars written to TensorBoard (`TrainingCurves`), one progress line every N
steps when the output goes to a file (`Progress`), the progress bar on a terminal (`StepBar`), and the paragraph
printed at the end (`summary`)."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

QUIET_MESSAGES = ("Tip: For seamless",)
"""Lightning's advertisements (litlogger, cloud uploads), printed at the start of every run."""


def silence_noise() -> None:
    """Drop Lightning's advertisement lines and the deprecation warning its pytree helper triggers in torch (both say
    nothing about the run)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in target.filters):
            target.addFilter(_DropMessages())


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in str(record.msg) for m in QUIET_MESSAGES)


def fmt_seconds(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


class TrainingCurves:
    """Scalars summed over one logging interval and written as averages at its end: a kind that did not run in the
    interval writes nothing (no repeated value), `train/loss` is the interval's mean rather than one sample, tokens per
    second is the interval's tokens over its wall time; `train/tokens` and `train/samples` count from the run's
    start (all ranks, carried across resumes)."""

    def __init__(self):
        self.tokens = 0
        self.samples = 0
        self._start_window()

    def _start_window(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.window_tokens = 0
        self.window_samples = 0
        self.window_start = time.perf_counter()

    def add(self, tokens: int, samples: int, values: dict[str, float]) -> None:
        """One training step (or micro-batch): its token and sample counts and its scalars."""
        self.window_tokens += int(tokens)
        self.window_samples += int(samples)
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, reduce_counts: Callable[[list[int]], list[int]] = lambda x: x) -> dict[str, float]:
        """The interval's averages plus the counters, then a new interval. `reduce_counts` sums the window's
        [tokens, samples] over ranks."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        window_tokens, window_samples = reduce_counts([self.window_tokens, self.window_samples])
        self.tokens += window_tokens
        self.samples += window_samples
        out = {key: self.sums[key] / self.counts[key] for key in self.sums}
        out.update({"train/tokens": float(self.tokens), "train/samples": float(self.samples),
                    "train/tokens_per_s": window_tokens / elapsed})
        self._start_window()
        return out

    def state_dict(self) -> dict[str, int]:
        return {"tokens": self.tokens, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.tokens, self.samples = int(state["tokens"]), int(state["samples"])


class Progress(L.Callback):
    """One line every `every` steps: step, mean loss (and LM loss) since the previous line, tokens per second,
    validation accuracy when there is one, elapsed time and ETA. For output that is not a terminal."""

    def __init__(self, label: str, every: int, write: Callable[[str], None] | None = None):
        self.label, self.every = label, max(1, every)
        self.write = write or (lambda line: print(line, flush=True))
        self.losses: dict[str, list[float]] = {"train/loss": [], "train/lm_loss": []}
        self.val_acc: float | None = None
        self.t0 = self.t_line = time.perf_counter()
        self.tokens_at_line = 0

    def on_train_start(self, trainer, pl_module):
        self.t0 = self.t_line = time.perf_counter()
        self.first_step = trainer.global_step
        self.tokens_at_line = _seen_tokens(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for key, values in self.losses.items():
            value = trainer.callback_metrics.get(key)
            if value is not None:
                values.append(float(value))
        step, total = trainer.global_step, trainer.max_steps
        if trainer.global_rank != 0 or not (step % self.every == 0 or step == total):
            return
        now = time.perf_counter()
        elapsed, done = now - self.t0, step - getattr(self, "first_step", 0)
        eta = elapsed / done * (total - step) if done > 0 and total > 0 else 0.0
        tokens = _seen_tokens(pl_module)
        rate = (tokens - self.tokens_at_line) / max(now - self.t_line, 1e-9)
        self.t_line, self.tokens_at_line = now, tokens
        parts = [f"[{self.label}] step {step:>5}/{total}"]
        for key, name in (("train/loss", "loss"), ("train/lm_loss", "lm loss")):
            if self.losses[key]:
                parts.append(f"{name} {sum(self.losses[key]) / len(self.losses[key]):.3f}")
                self.losses[key] = []
        parts.append(f"{rate:,.0f} tokens/s")
        if self.val_acc is not None:
            parts.append(f"val acc {self.val_acc:.2f}")
        parts.append(f"{fmt_seconds(elapsed)} elapsed, ~{fmt_seconds(eta)} left")
        self.write("  " + "  ".join(parts))

    def on_validation_end(self, trainer, pl_module):
        acc = trainer.callback_metrics.get("val/token_acc")   # facts data: the answer tokens alone
        if acc is not None:
            self.val_acc = float(acc)


def _seen_tokens(module) -> int:
    curves = getattr(module, "curves", None)
    return 0 if curves is None else curves.tokens + curves.window_tokens


class StepBar(RichProgressBar):
    """Lightning's bar over `max_steps`, labelled with the run's name (the memory stages run one endless epoch, which
    the default label shows as `Epoch 0/-2`)."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def _get_train_description(self, current_epoch: int) -> str:
        return self.label


def on_terminal() -> bool:
    return sys.stdout.isatty()


def summary(name: str, steps: int, seconds: float, metrics: dict[str, float], checkpoint: str | None,
            export: str) -> str:
    """The paragraph printed at the end of a run."""
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                       if k.startswith(("train/loss", "train/lm_loss", "val/")))
    return (f"{name}: trained {steps} steps in {fmt_seconds(seconds)}. Final {losses or 'losses: none logged'}. "
            f"Newest checkpoint: {checkpoint or 'none saved'}. Export: {export}.")
