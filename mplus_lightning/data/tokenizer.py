"""Tokenizers: load a local HF tokenizer directory, encode without special tokens, check against the model,
and train a tiny BPE tokenizer for tests and the CPU demo (nothing can be downloaded there).

Training inputs never carry a BOS token: the model has a learned per-layer BOS vector instead (DESIGN.md §2), and
the official code tokenizes with ``add_special_tokens=False`` (research/training.md §1.3). `encode` also treats
special-token strings that occur in the *text* (``<|begin_of_text|>`` in a web page) as plain text, so a document
can never smuggle a BOS/EOS id into the inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What `save_pretrained` writes for a fast tokenizer (a Llama-3.1 directory has both; `tokenizer.json` is the
vocabulary and merges, `tokenizer_config.json` names the special tokens)."""

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
"""Special tokens of `train_tiny_tokenizer`, with ids 0, 1, 2 (our tiny model configs use bos 1 / eos 2)."""


def load_tokenizer(path: str | Path) -> Any:
    """Load a fast HF tokenizer from a local directory (never from the hub).

    Raises:
        FileNotFoundError: the directory or its ``tokenizer.json`` is missing; the message names the path and the
            files that are expected there.
    """
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    expected = (
        f"expected a local Hugging Face tokenizer directory with {' and '.join(TOKENIZER_FILES)} "
        "(as written by `tokenizer.save_pretrained(DIR)`, e.g. the Llama-3.1-8B model directory, or "
        "`mplus_lightning.data.tokenizer.train_tiny_tokenizer` for tests)"
    )
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist: {expected}")
    missing = [f for f in TOKENIZER_FILES[:1] if not (p / f).is_file()]
    if missing:
        present = sorted(x.name for x in p.iterdir())[:20]
        raise FileNotFoundError(
            f"tokenizer directory {str(p)!r} has no {missing[0]} (it holds {present}): {expected}")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of `text` with no BOS/EOS added and special-token strings in the text encoded as plain text."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def check_tokenizer(tok: Any, vocab_size: int, *, bos_token_id: int | None = None,
                    eos_token_id: int | None = None) -> None:
    """Fail before training starts if `tok` can produce ids the model has no embedding for.

    Args:
        tok: the tokenizer.
        vocab_size: the model's ``vocab_size`` (rows of the embedding matrix).
        bos_token_id, eos_token_id: when given, the model config's ids; they must match the tokenizer's.

    Raises:
        ValueError: naming both sizes (or ids).
    """
    n = len(tok)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer {getattr(tok, 'name_or_path', '')!r} has {n} tokens but the model's vocab_size is "
            f"{vocab_size}: ids >= {vocab_size} would index past the embedding matrix; use the model's own "
            "tokenizer or a model config with a larger vocab_size")
    for name, want in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        have = getattr(tok, name, None)
        if want is not None and have is not None and have != want:
            raise ValueError(f"tokenizer {name}={have} but the model config says {name}={want}")


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Any:
    """Train a small byte-level BPE tokenizer and save it as a HF fast-tokenizer directory.

    The special tokens are ``<pad>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos) = 2, matching the tiny model configs.
    Byte-level BPE needs the 256 byte symbols plus the 3 specials, so `vocab_size` must be at least 259; the
    trained vocabulary may be smaller than `vocab_size` when the texts do not support more merges.

    Returns:
        The tokenizer loaded back from `out_dir` with `load_tokenizer` (so callers test the real loading path).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 259:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 bytes + 3 special tokens")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    tok = load_tokenizer(out)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2), "special token ids moved"
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """A short hash of the tokenizer's vocabulary, merges and normalization (identifies what token counts mean)."""
    import hashlib

    backend = getattr(tok, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]
