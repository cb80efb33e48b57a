"""Synthetic facts about people: the corpus, the question/answer pairs, and the training DataModule of the CPU demo.

The corpus (`generate_corpus`) is a deterministic function of a seed: people (a first name and a last name drawn
from fixed lists) each with a birth city, a birth year and an employer. A fact tells one of them (`Person.told`),
right after the name, e.g.

    Fact: Alice Moreno Lisbon.

and is asked about by name: the prompt "Recall: Alice Moreno" is answered with " Lisbon". The retention evaluation's
held-out facts tell city, year and employer in turn. Why this shape: answering is then a lookup a tiny transformer
forms within minutes, the induction pattern ("find the name earlier in the memory, continue with what followed
it"), and the row written at the answer token carries the name before it, which the retriever can match (the
retriever's positives are that row: `Sample.retrieval_positives`). The shapes tried before this one, and
what they scored, are in docs/demo-history.md.

People are split into three disjoint sets of (first, last) pairs: `train` (the only ones training ever sees), `val`
(validation during training) and `heldout` (the retention evaluation). A held-out person shares first and last
names with training people, never the pair, and their attributes are drawn independently: a model can only answer
about them by reading the fact back from its memory.

`write_corpus` lays the corpus out on disk (`data/generated/demo/` by default, git-ignored):

    facts.json                                 every person with their fact text and questions, per split
    retention/val_data.json                    held-out (context, question, answer) items: the evaluation's
                                               "processed" layout (mplus_lightning/data/eval_sets/retention.py)
    retention/unrelated_contexts_from_train.json   training facts, injected between a fact and its question
    tokenizer_texts.txt                        what the demo's tokenizer is trained on
    recall_documents.jsonl                     long documents of held-out facts and recalls of them (`text`), for
                                               `evaluate position-loss` / `short-context` on the demo's model

`FactsDataModule` (config `data.kind: facts`) turns the training people into samples: the contexts are one to a few
fact chunks (one fact per chunk), the target is "Recall: <name> <answer></s>" about one or more of them, with
`target_mask` False on the prompt so that the loss falls on the answer only (which is only recoverable from
memory). The stream is endless and deterministic (sample k of rank r depends only on the seed, r and k), so a
resumed run continues exactly (`samples_consumed`).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from .sample import Sample
from .stream import TokenizedDataModule, loader_generator
from .tokenizer import encode

FIRST_NAMES = (
    "Alice", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin", "Leo",
    "Maria", "Nico", "Olga", "Pablo", "Rosa", "Simon", "Tina", "Victor", "Wanda", "Yusuf", "Zoe", "Anton",
    "Berta", "Carlos", "Dora", "Emil", "Fiona", "Gustav", "Helen", "Igor", "Julia", "Kevin", "Laura", "Marco",
    "Nora", "Oscar", "Paula", "Ruben", "Sofia", "Tomas", "Ursula", "Vera", "Walter", "Xenia", "Yara", "Adam",
)
LAST_NAMES = (
    "Moreno", "Fischer", "Nakamura", "Okafor", "Larsen", "Rossi", "Novak", "Silva", "Kowalski", "Dubois",
    "Meyer", "Tanaka", "Haddad", "Jensen", "Costa", "Petrov", "Ortega", "Weber", "Sato", "Mensah", "Horvat",
    "Lindqvist", "Baker", "Romano", "Yilmaz", "Kim", "Brandt", "Varga", "Quinn", "Ferreira", "Ivanova", "Schmidt",
    "Duarte", "Morgan", "Hughes", "Khan", "Berg", "Nowak", "Torres", "Wolf", "Park", "Santos", "Keller", "Lopez",
    "Murphy", "Popescu", "Ahmed", "Castro",
)
CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Berlin", "Dublin", "Madrid", "Nairobi", "Tokyo", "Quito", "Vienna", "Zurich",
    "Prague", "Athens", "Bogota", "Hanoi", "Manila", "Dakar", "Tunis", "Minsk", "Riga", "Tallinn", "Seoul",
    "Havana", "Lagos", "Kyiv", "Turin", "Paris", "Chicago", "Denver", "Osaka", "Perth",
)
EMPLOYERS = (
    "Ardent", "Bluefin", "Corvex", "Dynamo", "Elmwood", "Fjord", "Granite", "Helix", "Ironbark", "Juniper",
    "Kestrel", "Lumen", "Mosaic", "Nimbus", "Onyx", "Pinnacle", "Quartz", "Redwood", "Summit", "Tidal", "Umbra",
    "Vertex", "Willow", "Zenith",
)
YEARS = tuple(str(y) for y in range(1950, 2000))

ATTRIBUTES = ("city", "year", "employer")
FACT_TEMPLATE = "Fact: {name} {value}."
"""One fact per person, 6 tokens (every word is one token of the demo's tokenizer): one memory block of K=6 rows.
"Fact:" in front keeps the name tokens the same as in the question (" Alice")."""
QUESTION = "Recall: {name}"
"""The question about a person, whichever attribute is asked: it ends on the name, so the next token is the one that
followed the name in the fact."""
CONTEXT_TEMPLATE = "{context}"
QUESTION_TEMPLATE = "{question}"
"""The demo evaluation's prompt (experiments/demo_eval.yaml `question_template`; the "processed" layout's default,
"Question: {question} Answer:", would put the answer tokens away from the name); training targets use exactly
this prompt followed by " <answer></s>"."""
REPEAT_INSTRUCTION = "Repeat:"
"""The repeat task's instruction (the memory stages' data.instruction default; the in_context layout's repeat)."""

SPLITS = ("train", "val", "heldout")
CORPUS_FILE = "facts.json"
RETENTION_DIR = "retention"
TOKENIZER_TEXTS = "tokenizer_texts.txt"
RECALL_DOCUMENTS = "recall_documents.jsonl"


def _check_lists() -> None:
    """Answers are scored by exact hit (the gold string occurs in the generated text): no answer may contain
    another, and names must be unique."""
    for group in (FIRST_NAMES, LAST_NAMES, CITIES, EMPLOYERS, YEARS):
        assert len(set(group)) == len(group), "duplicate entry in a word list"
    answers = CITIES + EMPLOYERS + YEARS
    for a, b in itertools.permutations(answers, 2):
        assert a not in b, f"answer {a!r} is contained in answer {b!r}: exact-hit scoring would be ambiguous"
    for a, name in itertools.product(answers, FIRST_NAMES + LAST_NAMES):
        assert a not in name, f"answer {a!r} is contained in the name {name!r}"


_check_lists()


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    city: str
    year: str
    employer: str
    told: str = "city"
    """The attribute its fact tells (and its question asks for)."""

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def fact(self) -> str:
        return FACT_TEMPLATE.format(name=self.name, value=self.value)

    @property
    def value(self) -> str:
        """The answer to its question: the told attribute."""
        return self.answer(self.told)

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)

    def question(self) -> str:
        return QUESTION.format(name=self.name)


@dataclass
class FactCorpus:
    seed: int
    train: list[Person]
    val: list[Person]
    heldout: list[Person]

    def split(self, name: str) -> list[Person]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose from {SPLITS}")
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "template": FACT_TEMPLATE, "question": QUESTION,
                **{s: [{**asdict(p), "name": p.name, "fact": p.fact(), "answer": p.value}
                       for p in self.split(s)] for s in SPLITS}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FactCorpus":
        fields = ("first", "last", "city", "year", "employer", "told")
        if data.get("template") != FACT_TEMPLATE:
            raise ValueError(f"this facts corpus was written with the fact template {data.get('template')!r}, this "
                             f"version writes {FACT_TEMPLATE!r}: regenerate it (python -m mplus_lightning.demo, "
                             "or mplus_lightning.data.facts.write_corpus)")
        return cls(seed=int(data["seed"]),
                   **{s: [Person(**{f: str(p[f]) for f in fields}) for p in data[s]] for s in SPLITS})


def generate_corpus(seed: int = 0, *, num_train: int | None = None, num_val: int = 64, num_heldout: int = 200
                    ) -> FactCorpus:
    """People with random attributes; the (first, last) pairs of the three splits are disjoint.

    `num_train` defaults to every pair not used by the other splits (48 x 48 - num_val - num_heldout).
    """
    rng = random.Random(f"facts:{seed}")
    pairs = list(itertools.product(FIRST_NAMES, LAST_NAMES))
    rng.shuffle(pairs)
    need = num_val + num_heldout
    if need >= len(pairs):
        raise ValueError(f"{need} val + held-out people leave no training people (only {len(pairs)} name pairs)")
    heldout_pairs, val_pairs, rest = pairs[:num_heldout], pairs[num_heldout:need], pairs[need:]
    if num_train is not None:
        if num_train > len(rest):
            raise ValueError(f"num_train={num_train}: only {len(rest)} name pairs are left for training")
        rest = rest[:num_train]

    def person(first: str, last: str, told: str) -> Person:
        return Person(first, last, rng.choice(CITIES), rng.choice(YEARS), rng.choice(EMPLOYERS), told)

    def people(pairs, told) -> list[Person]:
        return [person(*p, t) for p, t in zip(pairs, told)]

    # held-out facts tell city, year, employer in turn (the evaluation's items); the others a random attribute
    return FactCorpus(seed=seed, train=people(rest, (rng.choice(ATTRIBUTES) for _ in rest)),
                      val=people(val_pairs, (rng.choice(ATTRIBUTES) for _ in val_pairs)),
                      heldout=people(heldout_pairs, itertools.cycle(ATTRIBUTES)))


def with_fresh_attributes(person: Person, rng: random.Random) -> Person:
    """The same name with newly drawn attributes (and told attribute): a fact no weight can have memorised."""
    return Person(person.first, person.last, rng.choice(CITIES), rng.choice(YEARS), rng.choice(EMPLOYERS),
                  rng.choice(ATTRIBUTES))


def retention_items(people: Sequence[Person]) -> list[dict[str, str]]:
    """One (context, question, answer) item per person (held-out people tell city, year, employer in turn)."""
    return [{"context": p.fact(), "question": p.question(), "answer": p.value} for p in people]


def distractor_texts(corpus: FactCorpus, count: int = 400) -> list[str]:
    """Training facts in a seeded order: the unrelated contexts injected between a fact and its question."""
    people = list(corpus.train)
    random.Random(f"distractors:{corpus.seed}").shuffle(people)
    return [p.fact() for p in people[:count]]


def tokenizer_texts(corpus: FactCorpus) -> list[str]:
    """Every fact, question, prompt and answer the demo ever encodes (all splits: the vocabulary must cover the
    held-out names; it says nothing about who was born where)."""
    texts = [REPEAT_INSTRUCTION]
    for s in SPLITS:
        for p in corpus.split(s):
            texts.append(p.fact())
            texts.append(QUESTION_TEMPLATE.format(question=p.question()) + " " + p.value)
    return texts


RECALL_TEMPLATE = "Recall: {name} {value}."
"""A recall sentence of the documents below: the question and its answer, 6 tokens like a fact."""


def recall_documents(corpus: FactCorpus, num_documents: int = 20, sentences: int = 80, recall_every: int = 3
                     ) -> list[str]:
    """Long documents for the loss-by-position analysis (`evaluate position-loss`) on the demo's model: 6-token
    sentences about held-out people, each a new fact or (one in `recall_every`) "Recall: <name> <value>." about a
    person whose fact came any number of sentences earlier. Read in 6-token chunks, each recall's value token is
    predictable only from memory, further back the later it comes in the document."""
    rng = random.Random(f"recall-documents:{corpus.seed}")
    documents = []
    for _ in range(num_documents):
        people = rng.sample(corpus.heldout, sentences)   # distinct names: a recall names one fact
        told: list[Person] = []
        parts = []
        while len(parts) < sentences:
            if told and rng.randrange(recall_every) == 0:
                p = rng.choice(told)
                parts.append(RECALL_TEMPLATE.format(name=p.name, value=p.value))
            else:
                told.append(people[len(told)])
                parts.append(told[-1].fact())
        documents.append("".join(parts))   # "Madrid.Fact:" tokenizes as "Madrid." + "Fact:" (no space between)
    return documents


def write_corpus(corpus: FactCorpus, out_dir: str | Path, *, num_distractors: int = 400) -> dict[str, Path]:
    """Write the corpus files (module docstring); returns their paths."""
    out = Path(out_dir)
    (out / RETENTION_DIR).mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / CORPUS_FILE, "retention": out / RETENTION_DIR,
             "val_data": out / RETENTION_DIR / "val_data.json",
             "distractors": out / RETENTION_DIR / "unrelated_contexts_from_train.json",
             "tokenizer_texts": out / TOKENIZER_TEXTS, "documents": out / RECALL_DOCUMENTS}
    paths["corpus"].write_text(json.dumps(corpus.to_json(), indent=1))
    paths["val_data"].write_text(json.dumps(retention_items(corpus.heldout), indent=1))
    paths["distractors"].write_text(json.dumps(distractor_texts(corpus, num_distractors), indent=1))
    paths["tokenizer_texts"].write_text("\n".join(tokenizer_texts(corpus)) + "\n")
    paths["documents"].write_text("".join(json.dumps({"text": d}) + "\n" for d in recall_documents(corpus)))
    return paths


def load_corpus(path: str | Path) -> FactCorpus:
    """A corpus written by `write_corpus` (the directory or its facts.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / CORPUS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no facts corpus at {p}: generate one with `python -m mplus_lightning.demo` "
                                "(or mplus_lightning.data.facts.write_corpus)")
    return FactCorpus.from_json(json.loads(p.read_text()))


# ---------------------------------------------------------------------------------------------------- samples
@dataclass
class FactSample(Sample):
    """A facts sample: `target_mask` is False on the questions' prompts (the loss falls on the answers)."""

    answer: str = ""
    """The answer string (for inspection; training uses the ids)."""


class FactEncoder:
    """Fact chunks and question/answer targets as token ids, cached per string (the corpus repeats a lot)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        out = self._cache.get(text)
        if out is None:
            out = [t for t in encode(self.tokenizer, text) if t != self.bos]
            self._cache[text] = out
        return out

    def context(self, person: Person) -> torch.Tensor:
        return torch.tensor(self.ids(CONTEXT_TEMPLATE.format(context=person.fact())), dtype=torch.long)

    def target(self, question: str, answer: str, eos_in_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids (as the evaluation encodes them) + answer ids + EOS, and the loss mask: True on the answer
        (and on the EOS with `eos_in_loss`)."""
        prompt = self.ids(QUESTION_TEMPLATE.format(question=question))
        answer_ids = self.ids(" " + answer)
        eos = [self.eos] if self.eos is not None else []
        ids = torch.tensor(prompt + answer_ids + eos, dtype=torch.long)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(prompt):len(prompt) + len(answer_ids) + (len(eos) if eos_in_loss else 0)] = True
        return ids, mask

    def repeat_target(self, contexts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The repeat task in context: the instruction, then the facts again, scored on the copy."""
        instruction = torch.tensor(self.ids(REPEAT_INSTRUCTION), dtype=torch.long)
        body = torch.cat(list(contexts))
        mask = torch.cat([torch.zeros(len(instruction), dtype=torch.bool), torch.ones(len(body), dtype=torch.bool)])
        return torch.cat([instruction, body]), mask


def make_fact_sample(people: Sequence[Person], rng: random.Random, enc: FactEncoder, *, num_facts: int,
                     ask: str = "uniform", num_questions: int = 1, eos_in_loss: bool = True, doc_id: str = "",
                     source: str = "facts", position: int = -1) -> FactSample:
    """`num_facts` distinct people as context chunks (one fact each) and questions about them as the target.

    ask: which fact the first question is about: uniform (any injected fact), first (the oldest one: the longest
    distance in the sample) or last. Further questions (`num_questions` in all, at most one per fact) ask about the
    other facts in random order, each "Recall: <name> <answer></s>": more answer tokens per training step, each
    recoverable only from memory. `eos_in_loss`: also predict the EOS after each answer (training; validation scores
    the answer alone).
    """
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    chosen = rng.sample(range(len(people)), num_facts)
    if ask == "uniform":
        first = rng.randrange(num_facts)
    elif ask == "first":
        first = 0
    elif ask == "last":
        first = num_facts - 1
    else:
        raise ValueError(f"ask must be uniform, first or last, got {ask!r}")
    others = [j for j in range(num_facts) if j != first]
    rng.shuffle(others)
    asked = ([first] + others)[:num_questions]
    ids, masks = [], []
    for j in asked:
        person = people[chosen[j]]
        t, m = enc.target(person.question(), person.value, eos_in_loss=eos_in_loss)
        ids.append(t)
        masks.append(m)
    contexts = [enc.context(people[i]) for i in chosen]
    first_person = people[chosen[asked[0]]]
    # The retriever learns to fetch the first question's answer rows, queried by that question's prompt: labels of
    # "every fact this sample wrote" cannot be learnt from a question about one person, and of the asked fact's rows
    # the reader copies the answer from the answer's (with only that row retrieved a stage-3 demo model answered
    # 53-57% of facts 78 tokens old, with only the name rows 8-12%; trained on all rows of the fact, the retriever
    # fetched the name rows).
    positives = [torch.zeros(len(c), dtype=torch.bool) for c in contexts]
    positives[asked[0]][answer_positions(contexts[asked[0]], enc.ids(" " + first_person.value))] = True
    return FactSample(contexts=contexts, target=torch.cat(ids), doc_id=doc_id, source=source, position=position,
                      target_mask=torch.cat(masks), answer=first_person.value, retrieval_positives=positives,
                      retrieval_query_tokens=int(masks[0].int().argmax()))   # up to its first scored token


def answer_positions(context: torch.Tensor, answer_ids: list[int]) -> list[int]:
    """Token positions of the last occurrence of `answer_ids` in a fact chunk (every template ends with the value)."""
    ids, n = context.tolist(), len(answer_ids)
    for start in range(len(ids) - n, -1, -1):
        if ids[start:start + n] == answer_ids:
            return list(range(start, start + n))
    raise ValueError(f"the answer ids {answer_ids} do not occur in the fact chunk {ids}: the answer must be written "
                     "in the fact as the question asks it (FACT_TEMPLATE / QUESTION)")


INDUCTION_LENGTH = 96
"""Tokens per induction sample (about the length of an in-context facts sample)."""


def make_induction_sample(rng: random.Random, token_range: tuple[int, int], *, length: int = INDUCTION_LENGTH,
                          doc_id: str = "", position: int = -1) -> FactSample:
    """Random tokens in which a random segment (8-40 tokens) occurs a second time, at a random later offset; the loss
    is on the second occurrence after its first token. Only an induction head predicts it (find the current token
    earlier, copy what followed): the circuit that answering "Recall: <name>" needs. It forms on this task within
    ~800 steps of the demo's model, and did not form from the facts alone (docs/demo-history.md)."""
    low, high = token_range
    seg_len = rng.randint(8, min(40, length // 2))
    ids = [rng.randrange(low, high) for _ in range(length)]
    src = rng.randint(0, length - 2 * seg_len)
    dst = rng.randint(src + seg_len, length - seg_len)
    ids[dst:dst + seg_len] = ids[src:src + seg_len]
    mask = torch.zeros(length, dtype=torch.bool)
    mask[dst + 1:dst + seg_len] = True
    return FactSample(contexts=[], target=torch.tensor(ids, dtype=torch.long), doc_id=doc_id, source="induction",
                      position=position, target_mask=mask)


class FactStream(IterableDataset):
    """Endless facts samples of one rank, starting at sample `skip`; sample k depends on (seed, rank, k) only."""

    def __init__(self, people: Sequence[Person], enc: FactEncoder, *, seed: int, rank: int, skip: int,
                 num_facts: Sequence[int], num_facts_weights: Sequence[float] | None, ask: str,
                 num_questions: int = 1, repeat_ratio: float = 0.0, fresh_attributes: bool = False,
                 in_context: bool = False, induction_warmup: int = 0, induction_ratio: float = 0.0,
                 token_range: tuple[int, int] | None = None, namesake_ratio: float = 0.0):
        super().__init__()
        self.people, self.enc, self.seed, self.rank, self.skip = list(people), enc, seed, rank, skip
        self.num_facts, self.weights, self.ask = list(num_facts), num_facts_weights, ask
        self.num_questions, self.repeat_ratio, self.fresh_attributes = num_questions, repeat_ratio, fresh_attributes
        self.in_context = in_context
        self.induction_warmup, self.induction_ratio, self.token_range = induction_warmup, induction_ratio, token_range
        self.namesake_ratio = namesake_ratio
        self.by_name: dict[str, list[Person]] = {}
        for p in self.people if namesake_ratio else ():
            self.by_name.setdefault("first:" + p.first, []).append(p)
            self.by_name.setdefault("last:" + p.last, []).append(p)

    def sample(self, k: int) -> FactSample:
        rng = random.Random(f"{self.seed}:facts:{self.rank}:{k}")
        if self.induction_warmup or self.induction_ratio:   # no draw when off: facts-only streams stay as they were
            if k < self.induction_warmup or rng.random() < self.induction_ratio:
                return make_induction_sample(rng, self.token_range, doc_id=f"induction:{self.rank}:{k}", position=k)
        n = rng.choices(self.num_facts, weights=self.weights)[0]
        people = self.people
        if self.fresh_attributes:
            namesakes = self.namesake_ratio and rng.random() < self.namesake_ratio   # no draw when off
            group = self.namesakes(n, rng) if namesakes else rng.sample(people, n)
            people = [with_fresh_attributes(p, rng) for p in group]
        sample = make_fact_sample(people, rng, self.enc, num_facts=n, ask=self.ask,
                                  num_questions=self.num_questions, doc_id=f"facts:{self.rank}:{k}", position=k)
        if rng.random() < self.repeat_ratio:
            if self.in_context:   # the copy is part of the sequence; the memory stages build it from the chunks
                sample.target, sample.target_mask = self.enc.repeat_target(sample.contexts)
            else:
                sample.repeat = True
            # the copy is about every fact: the official labels
            sample.retrieval_positives = sample.retrieval_query_tokens = None
        return sample

    def namesakes(self, n: int, rng: random.Random) -> list[Person]:
        """n distinct people, all but one sharing the first or the last name of that one (in random order): a
        question about any of them has a namesake's fact in memory, whose rows only the other name tells apart."""
        anchor = rng.choice(self.people)
        # name pairs are unique: nobody but the anchor is in both lists
        pool = [p for p in self.by_name["first:" + anchor.first] + self.by_name["last:" + anchor.last]
                if p is not anchor]
        group = [anchor] + rng.sample(pool, min(n - 1, len(pool)))
        while len(group) < n:   # a name nobody else has: fill with anyone
            p = rng.choice(self.people)
            if all(p is not q for q in group):
                group.append(p)
        rng.shuffle(group)
        return group

    def __iter__(self) -> Iterator[FactSample]:
        for k in itertools.count(self.skip):
            yield self.sample(k)


def in_context_sequence(sample: FactSample) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample laid out for the plain Llama: its facts, then its target (the questions, or for a repeat sample
    the instruction and the facts again); the loss where the target's mask says."""
    facts = torch.cat(sample.contexts) if sample.contexts else sample.target[:0]   # induction samples have none
    ids = torch.cat([facts, sample.target])
    mask = torch.cat([torch.zeros(len(facts), dtype=torch.bool), sample.target_mask.bool()])
    return ids, mask


class InContextCollate:
    """Batches of in-context sequences, right-padded with `pad_id` (no loss there): {"input_ids", "loss_mask"}."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[FactSample]) -> dict[str, torch.Tensor]:
        seqs = [in_context_sequence(s) for s in samples]
        T = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, (ids, mask) in enumerate(seqs):
            input_ids[i, :len(ids)], loss_mask[i, :len(mask)] = ids, mask
        return {"input_ids": input_ids, "loss_mask": loss_mask}


@dataclass
class FactsParams:
    """`data.params` of data.kind=facts (`FactsDataModule`): samples from the CPU demo's facts corpus."""

    corpus: Optional[str] = None
    """The corpus folder (or its facts.json) that `write_corpus` wrote (required)."""
    tokenizer: Optional[str] = None
    """The corpus's tokenizer directory (required)."""
    num_facts: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """How many fact chunks a sample injects, drawn from this list..."""
    num_facts_weights: Optional[list[float]] = None
    """...with these weights (null: uniform)."""
    ask: str = "uniform"
    """Which injected fact the first question asks about: uniform | first | last."""
    num_questions: int = 1
    """Question/answer pairs per target."""
    repeat_ratio: float = 0.0
    """Share of "Repeat:" samples (the target repeats the injected facts)."""
    val_samples: int = 16
    """Validation samples, on people of the val split (answer accuracy: val/token_acc)."""
    val_num_facts: int = 2
    """Fact chunks per validation sample."""
    fresh_attributes: bool = False
    """Every training sample draws new attributes for its people: nothing to memorise, only reading to learn."""
    layout: str = "memory"
    """memory (one sample per step, facts injected: stages 1-3) | in_context (batches, for stage pretrain)."""
    batch_size: int = 1
    """Samples per batch of the in_context layout (the memory layout trains one sample per step)."""
    induction_warmup: int = 0
    """in_context layout: the first this many batches are induction samples (a repeated random segment)..."""
    induction_ratio: float = 0.0
    """...and this share of later samples too."""
    namesake_ratio: float = 0.0
    """Share of samples whose people share a first or last name (needs fresh_attributes)."""
    seed: int = 0
    """Data seed."""
    vocab_size: Optional[int] = None
    """The model's vocab size: the tokenizer is checked against it before training starts (null: not checked)."""


class FactsDataModule(TokenizedDataModule):
    """Training samples from the facts corpus (module docstring); `data.kind: facts` in a run config.

    Args:
        corpus: directory (or facts.json) written by `write_corpus`.
        tokenizer: tokenizer directory (`train_tiny_tokenizer`).
        num_facts: how many fact chunks a sample injects, drawn from this list...
        num_facts_weights: ...with these weights (default uniform).
        ask: which injected fact the (first) question is about: uniform | first | last.
        num_questions: question/answer pairs per target (`make_fact_sample`).
        repeat_ratio: share of "Repeat:" samples (the repeat task: the target is the instruction followed by the
            facts again, every token copied from memory, or in the in_context layout from earlier in the sequence).
        val_samples: validation samples (people of the `val` split; answer accuracy is logged as val/token_acc).
        val_num_facts: fact chunks per validation sample.
        fresh_attributes: every training sample draws new attributes for its people (names stay those of the
            training split): nothing can be memorised in the weights, the only way to answer is to read the facts.
        layout: `memory` (one sample per step: facts are injected, the questions read the memory; stages 1-3) or
            `in_context` (batches of facts followed by their questions, for the plain Llama of stage `pretrain`).
        batch_size: samples per batch of the in_context layout (the memory layout is one sample per step).
        induction_warmup: in_context layout: the first this many batches are induction samples
            (`make_induction_sample`: random tokens with a repeated segment), which form the lookup circuit...
        induction_ratio: ...and this share of later samples too, so that it stays.
        namesake_ratio: share of samples whose people share a first or last name (`FactStream.namesakes`; needs
            fresh_attributes). With 48 x 48 names, a fact 78 tokens old sits in a long-term memory of ~170 facts
            among ~3 namesakes each way; samples of 1-4 random people almost never hold one, so without them
            neither the reader nor the retriever learns to tell a fact from its namesakes' by the other name.
        seed: data seed; vocab_size: the model's (the tokenizer is checked against it).
    """

    LAYOUTS = ("memory", "in_context")
    params_schema = FactsParams

    def __init__(self, corpus: str, tokenizer: str | Any, *, num_facts: Sequence[int] = (1, 2, 3, 4),
                 num_facts_weights: Sequence[float] | None = None, ask: str = "uniform", num_questions: int = 1,
                 repeat_ratio: float = 0.0, val_samples: int = 16, val_num_facts: int = 2,
                 fresh_attributes: bool = False, layout: str = "memory", batch_size: int = 1,
                 induction_warmup: int = 0, induction_ratio: float = 0.0, namesake_ratio: float = 0.0,
                 seed: int = 0, vocab_size: int | None = None):
        super().__init__(tokenizer, seed=seed, vocab_size=vocab_size)
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, got {layout!r}")
        if layout == "memory" and batch_size != 1:
            raise ValueError(f"batch_size={batch_size}: the memory layout trains one sample per step (each sample "
                             "writes into the one memory of its rank); batches are for layout=in_context")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.layout, self.batch_size, self.fresh_attributes = layout, batch_size, fresh_attributes
        if (induction_warmup or induction_ratio) and layout != "in_context":
            raise ValueError("induction_warmup / induction_ratio are for layout=in_context (stage pretrain): the "
                             "memory layout has no sequence to copy within")
        if induction_warmup < 0 or not 0.0 <= induction_ratio <= 1.0:
            raise ValueError(f"induction_warmup must be >= 0 (got {induction_warmup}) and induction_ratio in [0, 1] "
                             f"(got {induction_ratio})")
        self.induction_warmup, self.induction_ratio = induction_warmup, induction_ratio
        if not 0.0 <= namesake_ratio <= 1.0:
            raise ValueError(f"namesake_ratio must be in [0, 1], got {namesake_ratio}")
        if namesake_ratio and not fresh_attributes:
            raise ValueError("namesake_ratio needs fresh_attributes=true: namesakes are drawn as people with new "
                             "attributes (a fixed set of people cannot be regrouped)")
        self.namesake_ratio = namesake_ratio
        if not num_facts or min(num_facts) < 1:
            raise ValueError(f"num_facts must list counts >= 1, got {list(num_facts)}")
        if num_facts_weights is not None and len(num_facts_weights) != len(num_facts):
            raise ValueError(f"num_facts_weights has {len(num_facts_weights)} entries, num_facts {len(num_facts)}")
        if ask not in ("uniform", "first", "last"):
            raise ValueError(f"ask must be uniform, first or last, got {ask!r}")
        self.corpus_path = corpus
        self.num_facts, self.num_facts_weights, self.ask = list(num_facts), num_facts_weights, ask
        self.num_questions = num_questions
        if not 0.0 <= repeat_ratio <= 1.0:
            raise ValueError(f"repeat_ratio must be in [0, 1], got {repeat_ratio}")
        self.repeat_ratio = repeat_ratio
        self.num_val, self.val_num_facts = val_samples, val_num_facts
        self._corpus: FactCorpus | None = None
        self._enc: FactEncoder | None = None

    @property
    def corpus(self) -> FactCorpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.corpus_path)
            if max(self.num_facts) > len(self._corpus.train):
                raise ValueError(f"num_facts up to {max(self.num_facts)} but the corpus has only "
                                 f"{len(self._corpus.train)} training people")
        return self._corpus

    @property
    def encoder(self) -> FactEncoder:
        if self._enc is None:
            self._enc = FactEncoder(self.tokenizer)
        return self._enc

    def setup(self, stage: str | None = None) -> None:
        _ = self.corpus, super().setup(stage)   # a missing corpus or a bad tokenizer fails before training starts

    def build_train_dataset(self, rank: int | None = None, world_size: int | None = None,
                            skip: int | None = None) -> FactStream:
        r, _ = self.rank_and_world()
        return FactStream(self.corpus.train, self.encoder, seed=self.seed, rank=r if rank is None else rank,
                          skip=self.samples_consumed if skip is None else skip, num_facts=self.num_facts,
                          num_facts_weights=self.num_facts_weights, ask=self.ask,
                          num_questions=self.num_questions, repeat_ratio=self.repeat_ratio,
                          fresh_attributes=self.fresh_attributes, in_context=self.in_context,
                          induction_warmup=self.induction_warmup * self.batch_size,
                          induction_ratio=self.induction_ratio, token_range=self.content_token_range(),
                          namesake_ratio=self.namesake_ratio)

    def content_token_range(self) -> tuple[int, int]:
        """[low, high) token ids of the induction task: the tokenizer's vocabulary after its special tokens."""
        specials = [i for i in self.tokenizer.all_special_ids if i is not None]
        return (max(specials) + 1 if specials else 0), len(self.tokenizer)

    @property
    def in_context(self) -> bool:
        return self.layout == "in_context"

    def make_loader(self, dataset) -> DataLoader:
        """Training and validation alike: one sample a step (memory layout) or padded batches (in_context)."""
        if self.in_context:
            pad = self.encoder.eos if self.encoder.eos is not None else 0
            return DataLoader(dataset, batch_size=self.batch_size, collate_fn=InContextCollate(pad),
                              generator=loader_generator())
        return super().make_loader(dataset)

    def train_dataloader(self) -> DataLoader:
        # Built at every iter() from samples_consumed, so a resumed run (or Lightning's next epoch) continues.
        return self.make_loader(self.build_train_dataset())

    def val_samples(self) -> list[FactSample]:
        people = self.corpus.val
        if self.num_val <= 0 or not people:
            return []
        rng = random.Random(f"{self.seed}:facts-val")
        n = min(self.val_num_facts, len(people))
        # One question about the oldest injected fact, scored on its answer tokens alone (val/token_acc = answer
        # accuracy), in the evaluation's prompt format.
        return [make_fact_sample(people, rng, self.encoder, num_facts=n, ask="first", eos_in_loss=False,
                                 doc_id=f"facts-val:{i}", source="facts-val", position=i) for i in range(self.num_val)]

    def fingerprint(self) -> list[list[Any]]:
        return [["facts", len(self.corpus.train), 1.0]]

    def state_dict(self) -> dict[str, Any]:
        return {"samples_consumed": int(self.samples_consumed), "seed": self.seed,
                "num_facts": self.num_facts, "ask": self.ask, "num_questions": self.num_questions,
                "sources": self.fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_consumed = int(state_dict["samples_consumed"])
