"""Parity with the official inference code: tiny checkpoints in the release layout and what it computed from them
(tests/fixtures/official/README.md). fp32: about 1e-5 relative on floats, exact on ids."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

from mplus_lightning import MemoryState, MPlus

from .conftest import FIXTURES

NAMES = ["mplus-tiny", "memoryllm-tiny"]


@pytest.fixture(scope="module", params=NAMES)
def official(request):
    path = FIXTURES / request.param
    model = MPlus.from_pretrained(path, dtype=torch.float32, device="cpu")
    memory = MemoryState.from_pretrained(path)
    return request.param, model, memory, load_file(str(path / "expected.safetensors"))


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_write_reproduces_delta_memory(official):
    _, model, memory, expected = official
    close(model.write(memory, expected["context_ids"]), expected["delta_memory"])


def test_short_chunk_write_reprocesses_old_rows_like_official(official):
    _, model, memory, expected = official
    with pytest.warns(UserWarning, match="chunk of 5 tokens"):
        delta = model.write(memory, expected["short_context_ids"])
    close(delta, expected["delta_memory_short"])


def test_read_reproduces_prompt_logits_and_retrieval(official):
    name, model, memory, expected = official
    logits, retrieved = model.read(memory, expected["prompt_ids"], return_retrieved=True)
    close(logits[0], expected["prompt_logits"])
    if name == "mplus-tiny":
        assert torch.equal(retrieved[:, 0], expected["retrieved_ltm_rows"])
    else:
        assert retrieved is None


def test_generate_reproduces_greedy_ids(official):
    _, model, memory, expected = official
    new = expected["greedy_ids"].numel() - expected["prompt_ids"].shape[1]
    ids = model.generate(memory, expected["prompt_ids"], max_new_tokens=new)
    assert ids[0].tolist() == expected["greedy_ids"].tolist()


def test_public_api_leaves_memory_unchanged(official):
    _, model, memory, expected = official
    before = memory.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.write(memory, expected["context_ids"])
    model.read(memory, expected["prompt_ids"])
    model.generate(memory, expected["prompt_ids"], max_new_tokens=2)
    assert torch.equal(memory.rows, before.rows) and torch.equal(memory.ranks, before.ranks)
