"""Shared fixtures: tiny random models and the official fixtures copied from ../shared/fixtures/official."""
import os

# Spin-waiting OpenMP threads stall ~10x when a core is shared (as in CI): yield instead. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mplus_lightning import MPlus, tiny_config  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "official"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def randomize_adapters(model: MPlus, scale: float = 0.05, seed: int = 1) -> MPlus:
    """LoRA B starts at zero (adapters are no-ops); give every trainable weight random values so tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def random_ids(n: int, batch: int = 1, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """Token ids without the special ids 0-2 (no BOS at position 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def filled(model, chunks: int = 6, seed: int = 0):
    """A memory after `chunks` injections of 20-token random chunks: after one the pool is full and the long-term
    memory empty; each later one moves K rows per layer into the long-term memory."""
    memory = model.new_memory(seed=seed)
    g = torch.Generator().manual_seed(seed)
    for i in range(chunks):
        model.inject(memory, random_ids(20, seed=100 + i), generator=g)
    return memory


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomize_adapters(MPlus(tiny_config()).eval())


@pytest.fixture
def tiny_memoryllm():
    torch.manual_seed(0)
    return randomize_adapters(MPlus(tiny_config(num_ltm_blocks=0, num_blocks=5)).eval())


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A facts corpus (mplus_lightning/data/facts.py) with its tokenizer, written once per test session."""
    from mplus_lightning.data import facts as F
    from mplus_lightning.data.tokenizer import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("facts")
    corpus = F.generate_corpus(5)
    F.write_corpus(corpus, out)
    train_tiny_tokenizer(F.tokenizer_texts(corpus), 1024, out / "tokenizer")
    return out
