"""Knowledge-retention sets of the MemoryLLM and M+ papers: SQuAD v2, Natural Questions (simplified), and the
processed `val_data.json` layout, plus the distractor contexts that are injected between a context and its question.

On-disk layouts (the official `YuWangX/KnowledgeRetention` / `KnowledgeRetentionProcessed` releases):

    data/squad/dev-v2.0.json            SQuAD v2 dev (the questions)
    data/squad/train-v2.0.json          SQuAD v2 train (the distractors, for both datasets: the paper's choice)
    data/squad/indices_squad_3.npy      indices into the answerable dev questions (answers of <= 3 tokens, filtered)
    data/nq/v1.0-simplified_nq-dev-all.jsonl[.gz]          NQ simplified dev (the questions)
    data/nq/v1.0-simplified_simplified-nq-train.jsonl[.gz] NQ simplified train (only for nq_train distractors)
    data/nq/indices_nq_4.npy                               indices into the NQ dev items that have a short answer
    <processed>/val_data.json                  list of objects whose values are (context, question, answer), in order
    <processed>/unrelated_contexts_from_train.json   list of distractor strings

What an item is, exactly as the official loaders flatten the files (so the released index files select the same
questions):
* SQuAD: every question of `data[].paragraphs[].qas[]` in file order that is not `is_impossible` and has an answer;
  context = the paragraph, answer = `answers[0].text`.
* NQ: every line whose `annotations[0].short_answers` is non-empty; context = the long-answer tokens and answer = the
  first short answer's tokens, both joined by spaces with HTML tokens removed. Dev lines carry `document_tokens`
  ({token, html_token}); train lines carry `document_text` (split on spaces; a token `<...>` is HTML). The official
  train loader slices `document_text` by *characters* with token offsets (a bug); we slice tokens.

Distractors: consecutive source texts (SQuAD-train paragraph contexts, NQ-train long answers, or the
processed strings) are concatenated with spaces until the concatenation has at least `min_tokens` tokens, then cut to
`max_tokens` (official: SQuAD >= 768 then 512; NQ > 512, i.e. >= 513, then 512). The same list serves every question.
Distractors are kept as token ids, so what is injected is exactly what is counted as distance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import DataFormatError, iter_jsonl, load_json, require_fields

SQUAD_DEV = "dev-v2.0.json"
SQUAD_TRAIN = "train-v2.0.json"
SQUAD_INDEX = "indices_squad_3.npy"
NQ_DEV = "v1.0-simplified_nq-dev-all.jsonl"
NQ_TRAIN = "v1.0-simplified_simplified-nq-train.jsonl"
NQ_INDEX = "indices_nq_4.npy"
PROCESSED_ITEMS = "val_data.json"
PROCESSED_DISTRACTORS = "unrelated_contexts_from_train.json"

LAYOUTS = f"""expected one of these layouts:
  SQuAD:     DIR/{SQUAD_DEV} [+ DIR/{SQUAD_INDEX}] [+ DIR/{SQUAD_TRAIN} for the distractors]
  NQ:        DIR/{NQ_DEV}[.gz] [+ DIR/{NQ_INDEX}]
             [+ DIR/../squad/{SQUAD_TRAIN} or DIR/{SQUAD_TRAIN} for the distractors]
  processed: DIR/{PROCESSED_ITEMS} + DIR/{PROCESSED_DISTRACTORS}
  (DIR may also be the parent holding squad/, nq/ or nqa/ folders; pick one with dataset=squad|nq|processed)"""

# The official prompts: "Questions" (plural) is what the official test script sends.
TEMPLATES = {
    "squad": ("Context: {context}", "Questions: {question} Answer:"),
    "nq": ("Context: {context}", "Questions: {question}? Answer:"),
    "processed": ("{context}", "Question: {question} Answer:"),
}
# min_tokens of the distractor concatenation rule, per source.
DISTRACTOR_MIN_TOKENS = {"squad_train": 768, "nq_train": 513, "processed": 0}


@dataclass
class RetentionItem:
    id: str
    context: str
    question: str
    answer: str


@dataclass
class RetentionSet:
    """The questions of one retention dataset and where its distractors come from."""

    name: str                                    # squad | nq | processed
    items: list[RetentionItem]
    distractor_source: str                       # squad_train | nq_train | processed
    distractor_path: Path
    context_template: str
    question_template: str
    files: dict[str, str] = field(default_factory=dict)

    def distractor_texts(self) -> Iterator[str]:
        """The distractor source texts, in file order (read lazily)."""
        return DISTRACTOR_READERS[self.distractor_source](self.distractor_path)


# ---- SQuAD ------------------------------------------------------------------------------------------------------
def _squad_articles(path: Path) -> list:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataFormatError(f"{path}: not a SQuAD file (expected an object with a `data` list of articles)")
    return data["data"]


def read_squad(path: str | Path) -> list[RetentionItem]:
    """Every answerable question of a SQuAD v1.1/v2 file, in file order (the list the index file points into).

    A question not marked ``is_impossible`` must have an answer: one without is an error, not left out, since leaving
    it out would shift every later item under the released index file.
    """
    path = Path(path)
    items = []
    for a, article in enumerate(_squad_articles(path)):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            require_fields(para, ("context", "qas"), where)
            _require_str(para["context"], f"{where}.context")
            if not isinstance(para["qas"], list):
                raise DataFormatError(f"{where}.qas: expected a list of questions, got {type(para['qas']).__name__}")
            for q, qa in enumerate(para["qas"]):
                at = f"{where}.qas[{q}]"
                require_fields(qa, ("question",), at)
                _require_str(qa["question"], f"{at}.question")
                if qa.get("is_impossible", False):
                    continue
                answers = qa.get("answers")
                if not isinstance(answers, list) or not answers:
                    raise DataFormatError(f"{at}: no answer (`answers` is {answers!r:.40}) but not marked "
                                          "is_impossible: give it `answers: [{\"text\": ...}]` or `is_impossible: "
                                          "true`")
                if not isinstance(answers[0], dict) or "text" not in answers[0]:
                    raise DataFormatError(f"{at}.answers[0]: expected an object with `text`")
                _require_str(answers[0]["text"], f"{at}.answers[0].text")
                items.append(RetentionItem(id=str(qa.get("id", f"{a}-{p}-{q}")), context=para["context"],
                                           question=qa["question"], answer=answers[0]["text"]))
    return items


def _require_str(value, where: str) -> None:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: expected a string, got {type(value).__name__} {value!r:.40}")


def squad_contexts(path: str | Path) -> Iterator[str]:
    """The paragraph contexts of a SQuAD file, in file order (each paragraph once)."""
    path = Path(path)
    for article in _squad_articles(path):
        for para in article.get("paragraphs", []) if isinstance(article, dict) else []:
            if isinstance(para, dict) and isinstance(para.get("context"), str):
                yield para["context"]


# ---- Natural Questions ------------------------------------------------------------------------------------------
def _is_html(token: str) -> bool:
    return token.startswith("<") and token.endswith(">")


def _nq_tokens(obj: dict, where: str) -> list[tuple[str, bool]]:
    """(token, is_html) of an NQ simplified example: dev `document_tokens` or train `document_text`."""
    if "document_tokens" in obj:
        try:
            tokens = [(t["token"], bool(t["html_token"])) for t in obj["document_tokens"]]
        except (TypeError, KeyError):
            raise DataFormatError(f"{where}: document_tokens entries need `token` and `html_token`") from None
        if not all(isinstance(t, str) for t, _ in tokens):
            raise DataFormatError(f"{where}: every document_tokens[].token must be a string")
        return tokens
    if "document_text" in obj:
        _require_str(obj["document_text"], f"{where}: document_text")
        return [(t, _is_html(t)) for t in obj["document_text"].split(" ")]
    raise DataFormatError(f"{where}: an NQ example needs `document_tokens` (dev) or `document_text` (train)")


def _span_text(tokens: list[tuple[str, bool]], span: dict, where: str) -> str:
    try:
        start, end = int(span["start_token"]), int(span["end_token"])
    except (TypeError, KeyError, ValueError):
        raise DataFormatError(f"{where}: a span needs integer `start_token` and `end_token`") from None
    return " ".join(t for t, html in tokens[max(start, 0):max(end, 0)] if not html)


def read_nq(path: str | Path, stop_after: int | None = None) -> list[RetentionItem]:
    """Every NQ simplified example with a short answer, in file order (the list the index file points into).

    `stop_after`: stop reading once this many items are collected (the dev file is 6.4 GB).
    """
    path = Path(path)
    items: list[RetentionItem] = []
    for lineno, obj in iter_jsonl(path, offer_skip=False):
        where = f"{path}:{lineno}"
        require_fields(obj, ("question_text", "annotations"), where)
        _require_str(obj["question_text"], f"{where}: question_text")
        annotations = obj["annotations"]
        if not isinstance(annotations, list) or not annotations or not isinstance(annotations[0], dict):
            raise DataFormatError(f"{where}: `annotations` must be a non-empty list of objects")
        ann = obj["annotations"][0]
        short = ann.get("short_answers") or []
        if not short:
            continue
        if "long_answer" not in ann:
            raise DataFormatError(f"{where}: annotations[0] has no `long_answer`")
        tokens = _nq_tokens(obj, where)
        items.append(RetentionItem(id=str(obj.get("example_id", lineno)), question=obj["question_text"],
                                   context=_span_text(tokens, ann["long_answer"], where),
                                   answer=_span_text(tokens, short[0], where)))
        if stop_after is not None and len(items) >= stop_after:
            break
    return items


def nq_long_answers(path: str | Path) -> Iterator[str]:
    """Long-answer texts of an NQ simplified file (train or dev), skipping examples without a long answer."""
    path = Path(path)
    for lineno, obj in iter_jsonl(path, offer_skip=False):
        where = f"{path}:{lineno}"
        require_fields(obj, ("annotations",), where)
        ann = (obj["annotations"] or [{}])[0]
        la = ann.get("long_answer") if isinstance(ann, dict) else None
        if not la or int(la.get("start_token", -1)) < 0:
            continue
        text = _span_text(_nq_tokens(obj, where), la, where)
        if text:
            yield text


# ---- processed layout -------------------------------------------------------------------------------------------
def read_processed(path: str | Path) -> list[RetentionItem]:
    """`val_data.json`: a list of objects whose values are context, question, answer, in that order."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of (context, question, answer) objects")
    items = []
    for i, obj in enumerate(data):
        values = list(obj.values()) if isinstance(obj, dict) else obj if isinstance(obj, list) else None
        if values is None or len(values) < 3 or not all(isinstance(v, str) for v in values[:3]):
            raise DataFormatError(f"{path}: entry {i} must hold three strings (context, question, answer), "
                                  f"got {obj!r:.120}")
        items.append(RetentionItem(id=str(i), context=values[0], question=values[1], answer=values[2]))
    return items


def processed_contexts(path: str | Path) -> Iterator[str]:
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
        raise DataFormatError(f"{path}: expected a JSON list of strings (distractor contexts)")
    yield from data


DISTRACTOR_READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    "squad_train": squad_contexts, "nq_train": nq_long_answers, "processed": processed_contexts}


# ---- index files --------------------------------------------------------------------------------------------------
def load_index(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        idx = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not a readable .npy index file ({e})") from None
    idx = np.asarray(idx).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise DataFormatError(f"{path}: index file must hold integers, got dtype {idx.dtype}")
    return idx.astype(np.int64)


def select(items: list[RetentionItem], index: np.ndarray | None, where: str) -> list[RetentionItem]:
    if index is None:
        return items
    bad = [int(i) for i in index if not 0 <= int(i) < len(items)]
    if bad:
        raise DataFormatError(f"{where}: indices {bad[:5]} are outside the {len(items)} items of the data file "
                              "(does the index belong to this file?)")
    return [items[int(i)] for i in index]


# ---- layout resolution ------------------------------------------------------------------------------------------
def _find(d: Path, name: str) -> Path | None:
    for cand in (d / name, d / (name + ".gz")):
        if cand.is_file():
            return cand
    return None


MAIN_FILES = {"squad": SQUAD_DEV, "nq": NQ_DEV, "processed": PROCESSED_ITEMS}
"""The file that makes a folder hold each layout (checked in this order when the dataset is not named)."""


def _detect(path: Path) -> tuple[str, Path]:
    """(dataset, main file) for a file or a directory holding one of the layouts."""
    if path.is_file():
        name = path.name.removesuffix(".gz")
        if name.endswith(".json") and name != PROCESSED_ITEMS and name != PROCESSED_DISTRACTORS:
            return "squad", path
        if name == PROCESSED_ITEMS:
            return "processed", path
        if name.endswith(".jsonl"):
            return "nq", path
        raise FileNotFoundError(f"{path}: cannot tell which retention dataset this file is; " + LAYOUTS)
    for name, fname in MAIN_FILES.items():
        f = _find(path, fname)
        if f is not None:
            return name, f
    raise FileNotFoundError(f"no retention data in {path}: " + LAYOUTS)


def resolve_layout(path: str | Path, dataset: str = "auto") -> tuple[str, Path]:
    """(dataset name, main data file) for `path` and the requested dataset (auto | squad | nq | processed)."""
    path = Path(path)
    if dataset not in ("auto", "squad", "nq", "processed"):
        raise ValueError(f"dataset must be auto, squad, nq or processed, got {dataset!r}")
    if not path.exists():
        raise FileNotFoundError(f"retention data path {path} does not exist: " + LAYOUTS)
    if path.is_dir() and dataset != "auto":
        # The named layout wins in a folder that holds several (squad/ may hold the processed files too).
        subdirs = {"squad": ["squad"], "nq": ["nq", "nqa"], "processed": ["squad", "nqa", "nq"]}[dataset]
        for d in [path, *(path / sub for sub in subdirs)]:
            f = _find(d, MAIN_FILES[dataset]) if d.is_dir() else None
            if f is not None:
                return dataset, f
    found, f = _detect(path)
    if dataset != "auto" and found != dataset:
        raise FileNotFoundError(f"{path} holds the {found} layout, not {dataset}: " + LAYOUTS)
    return found, f


def _distractor_file(dataset: str, main: Path, source: str) -> Path:
    d = main.parent
    if source == "squad_train":
        cands = [d / SQUAD_TRAIN, d.parent / "squad" / SQUAD_TRAIN]
    elif source == "nq_train":
        cands = [d / NQ_TRAIN, d / (NQ_TRAIN + ".gz"), d.parent / "nq" / NQ_TRAIN, d.parent / "nq" / (NQ_TRAIN + ".gz")]
    else:
        cands = [d / PROCESSED_DISTRACTORS]
    cands = list(dict.fromkeys(cands))
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{source} distractors for {dataset} not found: looked for "
                            + ", ".join(str(c) for c in cands) + " (set distractor_path=FILE)")


def load_retention_set(path: str | Path, *, dataset: str = "auto", index: str | None = "auto",
                       num_items: int | None = None, distractors: str = "auto",
                       distractor_path: str | None = None, context_template: str | None = None,
                       question_template: str | None = None) -> RetentionSet:
    """Read a retention dataset and decide where its distractors come from.

    index: "auto" (the official index file beside the data, if present), "none", or a .npy path.
    distractors: "auto" (SQuAD train for squad and nq, as in the paper; the layout's own
    unrelated_contexts_from_train.json for processed), "squad_train", "nq_train" or "processed".
    num_items: keep the first n selected items (the paper: 100).
    """
    name, main = resolve_layout(path, dataset)
    files = {"data": str(main)}
    if index in (None, "none", ""):
        index_path = None
    elif index == "auto":
        auto = {"squad": SQUAD_INDEX, "nq": NQ_INDEX}.get(name)
        index_path = main.parent / auto if auto and (main.parent / auto).is_file() else None
    else:
        index_path = Path(index)
        if not index_path.is_file():
            raise FileNotFoundError(f"index file {index_path} does not exist (index=auto|none|PATH.npy)")
    idx = load_index(index_path) if index_path is not None else None
    if idx is not None:
        files["index"] = str(index_path)
        if num_items is not None:
            idx = idx[:num_items]

    if name == "squad":
        items = read_squad(main)
    elif name == "nq":
        # Only read as far as the selection needs (the official loader stops there too).
        need = int(idx.max()) + 1 if idx is not None and idx.size else num_items
        items = read_nq(main, stop_after=need)
    else:
        items = read_processed(main)
    items = select(items, idx, str(index_path))
    if num_items is not None:
        items = items[:num_items]
    if not items:
        raise DataFormatError(f"{main}: no usable retention items (answerable questions) found")

    source = distractors
    if source == "auto":
        source = "processed" if name == "processed" else "squad_train"
    if source not in DISTRACTOR_READERS:
        raise ValueError(f"distractors must be auto, squad_train, nq_train or processed, got {distractors!r}")
    if distractor_path:
        dpath = Path(distractor_path)
        if not dpath.is_file():
            raise FileNotFoundError(f"distractor file {dpath} does not exist")
    else:
        dpath = _distractor_file(name, main, source)
    files["distractors"] = str(dpath)
    ctx_t, q_t = TEMPLATES[name]
    return RetentionSet(name=name, items=items, distractor_source=source, distractor_path=dpath,
                        context_template=context_template or ctx_t, question_template=question_template or q_t,
                        files=files)


# ---- distractor construction ------------------------------------------------------------------------------------
def build_distractors(texts: Iterable[str], encode: Callable[[str], list[int]], *, total_tokens: int,
                      min_tokens: int, max_tokens: int = 512) -> list[list[int]]:
    """Token-id distractors, concatenating consecutive `texts` until >= `min_tokens` then cutting to `max_tokens`.

    Builds distractors until their lengths add up to at least `total_tokens` or the texts run out. A leftover
    concatenation shorter than `min_tokens` at the end of the texts is still used.
    """
    if max_tokens < 1:
        raise ValueError(f"distractor max_tokens must be >= 1, got {max_tokens}")
    out: list[list[int]] = []
    have = 0
    current: str | None = None
    ids: list[int] = []
    for text in texts:
        if have >= total_tokens:
            break
        if not text.strip():
            continue
        current = text if current is None else current + " " + text
        ids = encode(current)
        if len(ids) >= min_tokens:
            out.append(ids[:max_tokens])
            have += len(out[-1])
            current, ids = None, []
    if current is not None and ids and have < total_tokens:
        out.append(ids[:max_tokens])
    return [d for d in out if d]
