"""Tokenizers: load a local HF tokenizer directory, encode without special tokens, check against the model,
and train a tiny BPE tokenizer for tests and the CPU demo (nothing can be downloaded there).

Training inputs never carry a BOS token: the model has a learned per-layer BOS vector instead, and the
official code tokenizes with ``add_special_tokens=False``. `encode` also treats
special-token strings that occur in the *text* (``<|begin_of_text|>`` in a web page) as plain text, so a document
can never smuggle a BOS/EOS id into the inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..typed_config import ConfigError
from .files import DataFormatError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What `save_pretrained` writes for a fast tokenizer (a Llama-3.1 directory has both; `tokenizer.json` is the
vocabulary and merges, `tokenizer_config.json` names the special tokens)."""

SLOW_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model")
"""A directory without tokenizer.json but with one of these holds a slow (sentencepiece) tokenizer."""

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
"""Special tokens of `train_tiny_tokenizer`, with ids 0, 1, 2 (our tiny model configs use bos 1 / eos 2)."""


def load_tokenizer(path: str | Path) -> Any:
    """Load a HF tokenizer from local disk (never from the hub): a directory with ``tokenizer.json`` (a fast
    tokenizer, e.g. the Llama-3.1-8B model directory), a ``tokenizer.json`` file, or a directory with only
    ``tokenizer_config.json`` / ``tokenizer.model`` (a slow sentencepiece tokenizer).

    Raises:
        FileNotFoundError: the path does not exist or holds no tokenizer; the message names the path and the files
            that are expected there.
        DataFormatError: the tokenizer files are there but cannot be read (malformed or truncated), naming them.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path).expanduser()
    expected = (
        f"expected a local Hugging Face tokenizer directory with {' and '.join(TOKENIZER_FILES)} "
        "(as written by `tokenizer.save_pretrained(DIR)`, e.g. the Llama-3.1-8B model directory, or "
        "`mplus_lightning.data.tokenizer.train_tiny_tokenizer` for tests), or a tokenizer.json file "
        "(evaluations: --tokenizer PATH)"
    )
    if p.is_file():
        return _readable(lambda: PreTrainedTokenizerFast(tokenizer_file=str(p)), p, expected)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer path {str(p)!r} does not exist: {expected}")
    if (p / TOKENIZER_FILES[0]).is_file() or any((p / f).is_file() for f in SLOW_TOKENIZER_FILES):
        main = p / TOKENIZER_FILES[0] if (p / TOKENIZER_FILES[0]).is_file() else p
        return _readable(lambda: AutoTokenizer.from_pretrained(str(p), local_files_only=True), main, expected)
    present = sorted(x.name for x in p.iterdir())[:20]
    raise FileNotFoundError(f"no tokenizer in {str(p)!r}: it has no {TOKENIZER_FILES[0]} (nor "
                            f"{' / '.join(SLOW_TOKENIZER_FILES)}; it holds {present}): {expected}")


def _readable(load: Any, path: Path, expected: str) -> Any:
    """`load()`, with any failure to parse the tokenizer files (the libraries raise KeyError, JSONDecodeError or a
    bare Exception) turned into one error naming them."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001
        raise DataFormatError(f"{path}: not a readable tokenizer ({type(e).__name__}: {e}); {expected}") from None


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of `text` with no BOS/EOS added and, with a HF tokenizer, special-token strings in the text encoded
    as plain text. Also takes a bare `tokenizers.Tokenizer` or any object whose `encode(text)` returns ids.

    Text that is not valid Unicode (a lone surrogate, e.g. from a ``"\\ud800"`` JSON escape) raises DataFormatError.
    """
    try:
        return _encode(tok, text)
    except TypeError:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataFormatError(f"text {text[max(0, e.start - 20):e.start + 20]!r} holds a lone surrogate at "
                                      f"character {e.start}: not valid Unicode, no tokenizer can encode it") from None
        raise


def _encode(tok: Any, text: str) -> list[int]:
    if callable(tok):
        try:
            return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        except TypeError:   # a callable that is not a HF tokenizer: fall back to its `encode`
            pass
    try:
        out = tok.encode(text, add_special_tokens=False)
    except TypeError:
        out = tok.encode(text)
    return [int(i) for i in (out.ids if hasattr(out, "ids") else out)]


TRAINING_FIX = ("use the model's own tokenizer (data.params.tokenizer) or a model config with a larger vocab_size "
                "(model.llama.vocab_size)")


def check_tokenizer(tok: Any, vocab_size: int, *, bos_token_id: int | None = None,
                    eos_token_id: int | None = None, fix: str = TRAINING_FIX) -> None:
    """Fail before training (or an evaluation) starts if `tok` can produce ids the model has no embedding for.

    Args:
        tok: the tokenizer.
        vocab_size: the model's ``vocab_size`` (rows of the embedding matrix).
        bos_token_id, eos_token_id: when given, the model config's ids; they must match the tokenizer's.
        fix: what the user should do, ending the message.

    Raises:
        ConfigError: naming both sizes (or ids) and the config keys.
    """
    n = len(tok)
    if n > vocab_size:
        raise ConfigError(
            f"tokenizer {getattr(tok, 'name_or_path', '')!r} has {n} tokens but the model's vocab_size is "
            f"{vocab_size}: ids >= {vocab_size} would index past the embedding matrix; {fix}")
    for name, want in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        have = getattr(tok, name, None)
        if want is not None and have is not None and have != want:
            raise ConfigError(f"tokenizer {name}={have} but the model config says {name}={want}")


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
