"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"mplus": "tab:red", "memoryllm": "tab:blue", "window": "tab:green", "borderline": "tab:gray"}
LABELS = {"mplus": "M+ (long-term memory on)", "memoryllm": "MemoryLLM mode (long-term memory off)",
          "window": "backbone, plain window"}


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG and close (matplotlib keeps every open figure alive)."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def retention_plot(results: dict, path: str | Path) -> Path:
    """Accuracy (exact hit) and QA-F1 against tokens injected after the context, one line per mode, plus the
    no-context borderline and the theoretical short-term decay curve."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in ((axes[0], "exact_hit", "accuracy (exact hit)"), (axes[1], "qa_f1", "QA-F1")):
        scale = 1000 if max(results.get("distances") or [0]) >= 2000 else 1
        for mode, curve in results["modes"].items():
            xs = [d / scale for d in curve["distances"]]
            ax.plot(xs, curve[metric], marker="o", color=COLORS.get(mode), label=LABELS.get(mode, mode))
            theory = results.get("theory", {}).get(mode)
            if theory and metric in theory:
                ax.plot(xs, theory[metric], linestyle="--", color=COLORS.get(mode), alpha=0.6,
                        label=f"theory, {mode} (N={theory['N']}, K={theory['K']})")
        if results.get("borderline"):
            ax.axhline(results["borderline"][metric], color=COLORS["borderline"], linestyle=":",
                       label=f"borderline (no context) {results['borderline'][metric]:.3f}")
        ax.set_xlabel("tokens injected after the context" + (" (k)" if scale == 1000 else ""))
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Knowledge retention: {results.get('dataset', '')}, {results.get('num_items', '?')} items, "
                 f"{Path(str(results.get('model', ''))).name}")
    return _save(fig, path)


def cost_plot(rows: list[dict], path: str | Path, device: str = "") -> Path:
    """Latency and peak memory against input length, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in rows}, key=lambda m: list(COLORS).index(m) if m in COLORS else 99)
    for m in methods:
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["length"])
        xs = [r["length"] / 1024 for r in pts]
        axes[0].plot(xs, [r["latency_s"] for r in pts], marker="o", color=COLORS.get(m), label=LABELS.get(m, m))
        axes[1].plot(xs, [r["peak_mb"] for r in pts], marker="o", color=COLORS.get(m), label=LABELS.get(m, m))
    axes[0].set_ylabel("latency (s)")
    axes[1].set_ylabel(f"peak memory (MB, {rows[0]['memory_metric'] if rows else ''})")
    for ax in axes:
        ax.set_xlabel("input length (k tokens)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Cost of one long input {('on ' + device) if device else ''}")
    return _save(fig, path)


def recall_plot(results: dict, path: str | Path) -> Path:
    """The retriever's recall of the context's long-term rows against tokens injected after the context (paper
    Fig. 6): the share retrieved beside a random pick's, and the rows retrieved beside the rows in the long-term
    memory (means per item and layer)."""
    recall = results["recall"]
    scale = 1000 if max(recall["distances"] or [0]) >= 2000 else 1
    xs = [d / scale for d in recall["distances"]]

    def points(key):
        return [(x, v) for x, v in zip(xs, recall[key]) if v is not None]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in (("recall", "retriever", "-"), ("random_recall", f"random pick of {recall['read_rows']}",
                                                              ":")):
        pts = points(key)
        axes[0].plot([x for x, _ in pts], [v for _, v in pts], linestyle=style, marker="o", color=COLORS["mplus"],
                     label=label)
    axes[0].set_ylabel("share of the context's long-term rows retrieved")
    axes[0].set_ylim(0, 1)
    for key, label, style in (("retrieved", "retrieved", "-"), ("in_ltm", "in the long-term memory", "--")):
        pts = points(key)
        axes[1].plot([x for x, _ in pts], [v for _, v in pts], linestyle=style, marker="o", color=COLORS["mplus"],
                     label=label)
    axes[1].set_ylabel(f"context rows per layer (of {recall['rows']})")
    for ax in axes:
        ax.set_xlabel("tokens injected after the context" + (" (k)" if scale == 1000 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Retriever recall: {results.get('dataset', '')}, {results.get('num_items', '?')} items, "
                 f"{Path(str(results.get('model', ''))).name}")
    return _save(fig, path)


def position_loss_plot(results: dict, path: str | Path) -> Path:
    """Mean next-token loss against the position in the document, one line per checkpoint (paper Fig. 4)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in results["models"].items():
        pts = [(s / 1000, v) for s, v in zip(curve["bucket_start"], curve["loss"]) if v is not None]
        ax.plot([x for x, _ in pts], [v for _, v in pts], marker=".", label=f"{label} (mean {curve['mean_loss']:.3f})")
    ax.set_xlabel(f"position in the document (k tokens; buckets of {results['bucket_tokens']})")
    ax.set_ylabel("next-token loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Loss by position: {results['num_documents']} documents, chunks of {results['chunk_tokens']} "
                 "tokens scored before they are written")
    return _save(fig, path)


def short_context_plot(results: dict, path: str | Path) -> Path:
    """Loss (and perplexity) of each method on the same short inputs (paper Sec. 4.6.1)."""
    methods = list(results["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = [COLORS.get("window" if m == "backbone" else m, "tab:gray") for m in methods]
    for ax, key, title in ((axes[0], "loss", "mean next-token loss"), (axes[1], "perplexity", "perplexity")):
        values = [results["methods"][m][key] for m in methods]
        bars = ax.bar(methods, values, color=colors)
        ax.bar_label(bars, fmt="%.4f", fontsize=8)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Short inputs (<= {results['max_tokens']} tokens): {results['num_documents']} documents, "
                 f"{Path(str(results.get('model', ''))).name}")
    return _save(fig, path)
