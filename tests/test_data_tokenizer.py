"""Tokenizer helpers: the tiny trained tokenizer, encoding without special tokens, bad-input errors."""

import pytest

from mplus_lightning.data.tokenizer import check_tokenizer, encode, load_tokenizer, train_tiny_tokenizer

from .test_data_common import tok, tok_dir, words  # noqa: F401  (fixtures)


def test_tiny_tokenizer_special_ids_and_roundtrip(tok, tok_dir):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert 259 <= len(tok) <= 512
    text = words(200, seed=5)
    ids = encode(tok, text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were learned
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file()


def test_encode_never_emits_special_tokens(tok):
    ids = encode(tok, "<s> kalo </s> mi <pad> ten")
    assert not {0, 1, 2} & set(ids)
    assert tok.decode(ids) == "<s> kalo </s> mi <pad> ten"


def test_load_tokenizer_missing_directory_names_path_and_files(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*tokenizer\.json"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"empty.*has no tokenizer\.json.*config\.json"):
        load_tokenizer(tmp_path / "empty")


def test_check_tokenizer_against_model_vocab(tok):
    check_tokenizer(tok, 512, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match=rf"has {len(tok)} tokens but the model's vocab_size is 300"):
        check_tokenizer(tok, 300)
    with pytest.raises(ValueError, match="bos_token_id=1 but the model config says bos_token_id=128000"):
        check_tokenizer(tok, 512, bos_token_id=128000)


def test_tiny_tokenizer_needs_room_for_bytes(tmp_path):
    with pytest.raises(ValueError, match="at least 256 bytes"):
        train_tiny_tokenizer(["a b c"], 100, tmp_path / "t")


def test_one_tokenizer_loader_for_training_and_evaluation(tok, tok_dir, tmp_path):
    from tokenizers import Tokenizer

    from mplus_lightning.eval import runtime

    assert runtime.load_tokenizer is load_tokenizer and runtime.encode is encode
    text = "kalo <s> mi"
    from_file = load_tokenizer(tok_dir / "tokenizer.json")           # a bare tokenizer.json (--tokenizer FILE)
    assert encode(from_file, text) == encode(tok, text)
    bare = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))      # not a HF tokenizer: its encode(...).ids
    assert encode(bare, "kalo mi") == encode(tok, "kalo mi")
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*none.*tokenizer_config\.json / tokenizer\.model"):
        load_tokenizer(tmp_path / "none")
