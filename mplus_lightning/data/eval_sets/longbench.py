"""LongBench QA subsets (the M+ paper's Tables 2-3) and the long-context input builder shared with LongBook.

Data: the official release (HF `THUDM/LongBench`, `data.zip`) has one JSON Lines file per subset,
`{subset}.jsonl`, each line with `input` (the question), `context`, `answers` (list), `length` (words), `dataset`,
`language`, `all_classes`, `_id`. The M+ paper uses six English QA subsets; their official prompt templates and
generation limits are below (the "asconcisely" typo of narrativeqa is part of the official template).

Long-context input builder: the prompt is tokenized whole; it is truncated to
`max_length - gen_tokens` tokens (tail truncation as in the MemoryLLM scripts, or LongBench's middle truncation);
its last `window_tokens - gen_tokens` tokens (the question is at the end) stay in the generation window; the rest is
cut *from the end backwards* into `chunk_tokens` pieces that are injected into memory oldest first. With 8k inputs,
a 2,048-token window and 512-token chunks, that is 12 chunks + the window (paper §4.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..files import DataFormatError, iter_jsonl, load_json, require_fields

QA_SUBSETS = ("2wikimqa", "hotpotqa", "qasper", "musique", "multifieldqa_en", "narrativeqa")

_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
             "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
             "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
_QASPER_RULE = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
                "answered based on the information in the article, write \"unanswerable\". If the question is a "
                "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
PROMPTS = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                    "question asconcisely as you can, using a single phrase if possible. Do not provide any "
                    "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
                    "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                    "{input}\n\nAnswer:"),
    "qasper": ("You are given a scientific article and a question. Answer the question " + _QASPER_RULE
               + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULE
               + "\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": _PASSAGES,
    "2wikimqa": _PASSAGES,
    "musique": _PASSAGES,
}
MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32}

LAYOUT = ("expected DIR/{subset}.jsonl (or DIR/data/{subset}.jsonl) per subset, as in LongBench's data.zip, or one "
          "{subset}.jsonl file; each line a JSON object with `input`, `context`, `answers`")


@dataclass
class LongBenchItem:
    id: str
    subset: str
    input: str
    context: str
    answers: list[str]
    length: int | None = None
    all_classes: list | None = None

    def prompt(self, template: str) -> str:
        return fill(template, context=self.context, input=self.input)


def fill(template: str, **fields: str) -> str:
    """`template.format(**fields)` that leaves every other brace alone (contexts may contain `{`)."""
    out = template
    for k, v in fields.items():
        out = out.replace("{" + k + "}", v)
    return out


def _subset_file(path: Path, subset: str) -> Path:
    for cand in (path / f"{subset}.jsonl", path / "data" / f"{subset}.jsonl"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"LongBench subset {subset!r} not found in {path}: {LAYOUT}")


def longbench_files(path: str | Path, subsets=QA_SUBSETS) -> dict[str, Path]:
    """{subset: file} that `read_longbench` reads (``{"data": path}`` for a single file)."""
    path = Path(path)
    if path.is_file():
        return {"data": path}
    return {s: _subset_file(path, s) for s in subsets}


def read_longbench_file(path: str | Path, subset: str | None = None) -> list[LongBenchItem]:
    """One `{subset}.jsonl` file; the subset name defaults to the file stem."""
    path = Path(path)
    subset = subset or path.name.removesuffix(".gz").removesuffix(".jsonl")
    items = []
    for lineno, obj in iter_jsonl(path, offer_skip=False):
        where = f"{path}:{lineno}"
        require_fields(obj, ("input", "context", "answers"), where)
        answers = obj["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataFormatError(f"{where}: `answers` must be a list of strings")
        if not isinstance(obj["context"], str) or not isinstance(obj["input"], str):
            raise DataFormatError(f"{where}: `context` and `input` must be strings")
        items.append(LongBenchItem(id=str(obj.get("_id", lineno)), subset=obj.get("dataset") or subset,
                                   input=obj["input"], context=obj["context"], answers=answers,
                                   length=obj.get("length"), all_classes=obj.get("all_classes")))
    return items


def read_longbench(path: str | Path, subsets=QA_SUBSETS) -> dict[str, list[LongBenchItem]]:
    """{subset: items} from a LongBench data directory (or a single subset file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LongBench data path {path} does not exist: {LAYOUT}")
    if path.is_file():
        items = read_longbench_file(path)
        return {items[0].subset if items else path.stem: items}
    return {s: read_longbench_file(_subset_file(path, s), s) for s in subsets}


def load_prompts(path: str | Path | None) -> dict[str, str]:
    """The official templates, updated from a `dataset2prompt.json`-style file if given."""
    prompts = dict(PROMPTS)
    if path:
        extra = load_json(path)
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise DataFormatError(f"{path}: expected a JSON object {{subset: template}}")
        prompts.update(extra)
    return prompts


# ---- the long-context input builder ----------------------------------------------------------------------------
@dataclass
class LongInput:
    """A tokenized long prompt split for a memory model: `chunks` (oldest first) to inject, then `window`."""

    chunks: list[list[int]]
    window: list[int]
    truncated: int = 0                       # prompt tokens dropped by max_length
    total: int = 0                           # prompt tokens before truncation
    chunk_lengths: list[int] = field(default_factory=list)

    @property
    def memory_tokens(self) -> int:
        return sum(len(c) for c in self.chunks)


def truncate(ids: list[int], budget: int | None, mode: str = "tail") -> list[int]:
    """Keep `budget` tokens: the last ones ("tail", MemoryLLM scripts) or first+last halves ("middle", LongBench)."""
    if budget is None or len(ids) <= budget:
        return list(ids)
    if budget <= 0:
        raise ValueError(f"truncation budget must be positive, got {budget}")
    if mode == "tail":
        return list(ids[-budget:])
    if mode == "middle":
        half = budget // 2
        return list(ids[:half]) + list(ids[len(ids) - (budget - half):])
    raise ValueError(f"truncation must be 'tail' or 'middle', got {mode!r}")


def build_long_input(ids: list[int], *, gen_tokens: int, window_tokens: int = 2048, chunk_tokens: int = 512,
                     max_length: int | None = None, truncation: str = "tail", min_chunk_tokens: int = 16,
                     bos_token_id: int | None = None) -> LongInput:
    """Split a tokenized prompt into memory chunks (oldest first) and a generation window.

    * BOS ids are removed (each memory layer has its own learned BOS; the model refuses a leading BOS).
    * With `max_length`, keep `max_length - gen_tokens` tokens (`truncation`: tail or middle).
    * The last `window_tokens - gen_tokens` tokens form the window; the rest is cut from the end backwards into
      `chunk_tokens` pieces. A first (oldest) piece shorter than `min_chunk_tokens` is merged into the next one
      instead of being written alone (short writes disturb the memory; the official README's minimum is 16).
    """
    if window_tokens - gen_tokens < 1:
        raise ValueError(f"window_tokens ({window_tokens}) must exceed the generated tokens ({gen_tokens})")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    ids = [int(t) for t in ids if bos_token_id is None or int(t) != bos_token_id]
    total = len(ids)
    if max_length is not None:
        ids = truncate(ids, max_length - gen_tokens, truncation)
    keep = window_tokens - gen_tokens
    window, rest = ids[-keep:], ids[:-keep] if len(ids) > keep else []
    chunks: list[list[int]] = []
    end = len(rest)
    while end > 0:
        start = max(0, end - chunk_tokens)
        chunks.append(rest[start:end])
        end = start
    chunks.reverse()
    if len(chunks) > 1 and len(chunks[0]) < min_chunk_tokens:
        chunks[1] = chunks[0] + chunks[1]
        chunks.pop(0)
    return LongInput(chunks=chunks, window=window, truncated=total - len(ids), total=total,
                     chunk_lengths=[len(c) for c in chunks])
