"""LongBook QA (InfiniteBench En.QA) and LongBook Event-QA (the M+ paper's long-book benchmarks).

LongBook QA: `longbook_qa_eng.jsonl` from HF `xinrongzhang2022/InfiniteBench`, one JSON object per line with `id`,
`context` (the whole book), `input` (the question), `answer` (list of strings) and `options` (empty). Older copies
use `question` for `input`; a plain-string `answer` is accepted as one answer. 351 items, books of ~192k tokens.
Prompt (InfiniteBench's base-model template; the M+ paper does not state its own), 40 new tokens, QA-F1 on 0-1.

LongBook Event-QA is not published: the paper built it with gpt-4o from the first five books. When a
user supplies it, this reader takes JSON Lines with one event per line:

    {"id": ..., "context": "<book text up to the event>"   (or "context_file": "books/x.txt", relative to the file),
     "past_events": ["...", ...],          the (five) preceding true events, oldest first
     "options": ["...", ... 6 strings],    the true next event among five fakes
     "answer": 2}                          index of the true option (or its exact text)

The model reads the book (through memory) and the past events, and must pick the next event; metric accuracy
(chance 1/6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import DataFormatError, iter_jsonl, require_fields

LONGBOOK_QA_FILE = "longbook_qa_eng.jsonl"
EVENT_QA_FILE = "longbook_event_qa.jsonl"

QA_TEMPLATE = ("Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
               "Question: {question}\nAnswer:")
LETTERS = "ABCDEFGHIJ"
EVENT_TEMPLATE = ("Read the book below and the events that happened so far, then choose the event that happens "
                  "next.\n\n{context}\n\nEvents so far:\n{past_events}\n\nWhich event happens next?\n{options}\n"
                  "Answer:")


@dataclass
class LongBookItem:
    id: str
    context: str
    question: str
    answers: list[str]
    options: list[str]

    def prompt(self, template: str = QA_TEMPLATE) -> str:
        return template.replace("{context}", self.context).replace("{question}", self.question)


@dataclass
class EventQAItem:
    id: str
    context: str
    past_events: list[str]
    options: list[str]
    answer: int

    def prompt(self, template: str = EVENT_TEMPLATE) -> str:
        past = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(self.past_events))
        opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options))
        return (template.replace("{context}", self.context).replace("{past_events}", past)
                .replace("{options}", opts))


def _resolve(path: str | Path, default_name: str, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        for cand in (path / default_name, path / (default_name + ".gz")):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"no {what} in {path}: expected {path / default_name}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist (expected {default_name}, JSON Lines)")
    return path


def longbook_file(path: str | Path, task: str = "qa") -> Path:
    """The file `read_longbook_qa` (task ``qa``) or `read_event_qa` (``event_qa``) reads for `path`."""
    if task == "event_qa":
        return _resolve(path, EVENT_QA_FILE, "LongBook Event-QA data")
    return _resolve(path, LONGBOOK_QA_FILE, "LongBook QA data")


def read_longbook_qa(path: str | Path) -> list[LongBookItem]:
    """Items of `longbook_qa_eng.jsonl` (or a directory holding it)."""
    path = _resolve(path, LONGBOOK_QA_FILE, "LongBook QA data")
    items = []
    for lineno, obj in iter_jsonl(path, offer_skip=False):
        where = f"{path}:{lineno}"
        require_fields(obj, ("context",), where)
        question = obj.get("input", obj.get("question"))
        if not isinstance(question, str):
            raise DataFormatError(f"{where}: missing the question (`input`, or `question` in older copies)")
        answers = obj.get("answer", obj.get("answers"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataFormatError(f"{where}: `answer` must be a non-empty list of strings")
        if not isinstance(obj["context"], str):
            raise DataFormatError(f"{where}: `context` must be a string (the book)")
        items.append(LongBookItem(id=str(obj.get("id", lineno - 1)), context=obj["context"], question=question,
                                  answers=answers, options=list(obj.get("options") or [])))
    return items


def read_event_qa(path: str | Path) -> list[EventQAItem]:
    """Items of a LongBook Event-QA JSON Lines file (format in the module docstring)."""
    path = _resolve(path, EVENT_QA_FILE, "LongBook Event-QA data")
    items = []
    for lineno, obj in iter_jsonl(path, offer_skip=False):
        where = f"{path}:{lineno}"
        require_fields(obj, ("options", "answer"), where)
        if "context" in obj:
            context = obj["context"]
        elif "context_file" in obj:
            cf = path.parent / obj["context_file"]
            if not cf.is_file():
                raise DataFormatError(f"{where}: context_file {cf} does not exist")
            context = cf.read_text(encoding="utf-8")
        else:
            raise DataFormatError(f"{where}: needs the book text as `context` or `context_file`")
        options = obj["options"]
        if not isinstance(options, list) or len(options) < 2 or len(options) > len(LETTERS) \
                or not all(isinstance(o, str) for o in options):
            raise DataFormatError(f"{where}: `options` must be a list of 2-{len(LETTERS)} strings")
        past = obj.get("past_events", [])
        if not isinstance(past, list) or not all(isinstance(e, str) for e in past):
            raise DataFormatError(f"{where}: `past_events` must be a list of strings")
        answer = obj["answer"]
        if isinstance(answer, str):
            if answer not in options:
                raise DataFormatError(f"{where}: `answer` text is not one of the options")
            answer = options.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise DataFormatError(f"{where}: `answer` must be an option index in [0, {len(options)}) or its text")
        items.append(EventQAItem(id=str(obj.get("id", lineno - 1)), context=context, past_events=past,
                                 options=options, answer=answer))
    return items
