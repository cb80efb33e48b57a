"""Validation per source: a mixture's validation set is also scored per source (`val/<source>/loss`,
`val/<source>/token_acc`, the means over that source's samples of all ranks), a single-source one only overall."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch

from mplus_lightning import config as C, fit
from mplus_lightning.data.mixture import MixtureDataModule
from mplus_lightning.stages import module_for
from mplus_lightning.stages.build import initial_memory
from mplus_lightning.stages.step import summed_over_ranks
from mplus_lightning.typed_config import ConfigError

from .test_data_common import slim_built, slim_src, tok, tok_dir  # noqa: F401  (fixtures)
from .test_data_mixture import fineweb_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
# The fixture's builder found no validation document for the two longest buckets (too few long documents).
VALIDATED = ["fineweb", "4k-8k", "8k-16k"]


def tiny_module():
    cfg = C.load(ROOT / "experiments" / "tiny.yaml", ["trainer.progress_bar=false"])
    module = module_for(cfg.stage)(cfg, [])
    module.memory = initial_memory(cfg, module.model, seed=0)
    return cfg, module


def validated(module, datamodule) -> dict[str, float]:
    # inference_mode=False: as in the validation of a fit (memory tensors must stay usable by training)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.fixture
def mixture(fineweb_dir, slim_built, tok_dir, tmp_path):  # noqa: F811
    return MixtureDataModule(fineweb_dir, slim_built, tok_dir, ratios="stage2", val_docs=5, val_size=3,
                             val_per_bucket=1, cache_dir=tmp_path / "cache", progress=False, seed=3)


def test_a_mixture_validation_is_scored_per_source_as_the_mean_of_its_samples(mixture, caplog):
    _, module = tiny_module()
    start = module.memory_step.state_dict()   # the eviction draws of validation come from here
    metrics = validated(module, mixture)
    samples = mixture.val_samples()
    # spread through the list, so that every rank's share and its first val_batches hold each source
    assert [s.val_source for s in samples] == ["fineweb", "fineweb", "4k-8k", "8k-16k", "fineweb"]
    assert "bucket 32k-64k is not validated" in caplog.text
    assert not any(s.repeat for s in samples) and all(s.contexts for s in samples if s.val_source != "fineweb")
    # the same samples scored one by one, from the same memory and draws
    module.memory_step.load_state_dict(start)
    module.eval()
    scores = defaultdict(list)
    with torch.no_grad():
        for s in samples:
            loss, accuracy = module.memory_step.validate(s, 0)
            scores[s.val_source].append((float(loss), float(accuracy)))
    expected = {"val/loss": sum(x for v in scores.values() for x, _ in v) / len(samples),
                "val/token_acc": sum(a for v in scores.values() for _, a in v) / len(samples)}
    for source, values in scores.items():
        expected[f"val/{source}/loss"] = sum(x for x, _ in values) / len(values)
        expected[f"val/{source}/token_acc"] = sum(a for _, a in values) / len(values)
    assert sorted(metrics) == sorted(expected) and len(expected) == 2 + 2 * len(VALIDATED)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # far enough apart that the comparisons above tell a source's mean from the overall one
    assert abs(expected["val/fineweb/loss"] - expected["val/loss"]) > 10 * 1e-5 * expected["val/loss"]


def test_a_single_source_validation_logs_only_the_overall_curves():
    cfg, module = tiny_module()
    metrics = validated(module, fit.build_datamodule(cfg))
    assert sorted(metrics) == ["val/loss", "val/token_acc"]


def test_bucket_validation_needs_the_builders_val_folders(fineweb_dir, slim_built, tok_dir, tmp_path):  # noqa: F811
    # the builder's val/ folder used as the training buckets (as stage 3 may be) has no val/ of its own
    without_val = MixtureDataModule(fineweb_dir, slim_built / "val", tok_dir, ratios={"fineweb": 1, "4k-8k": 1},
                                    val_docs=5, val_per_bucket=1, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ConfigError, match=r"val_per_bucket=1 .* --val-per-bucket N"):
        without_val.setup("fit")
    fineweb_only = MixtureDataModule(fineweb_dir, slim_built, tok_dir, val_docs=5, val_size=3,
                                     cache_dir=tmp_path / "cache", progress=False)
    fineweb_only.setup("fit")
    assert [s.val_source for s in fineweb_only.val_samples()] == ["fineweb"] * 3


def _sum_on_rank(rank: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    # rank 1's share of the validation set holds no 4k-8k sample: it must still take part, and add nothing
    mine = {"fineweb": [1.0, 0.5, 2.0], "4k-8k": [3.0, 1.0, 1.0]} if rank == 0 else {"fineweb": [2.0, 0.25, 1.0]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(summed_over_ranks(mine)))
    torch.distributed.destroy_process_group()


@pytest.mark.multirank
def test_sums_over_ranks_take_a_source_that_a_rank_lacks(tmp_path):
    # fork: the ranks start with this process's imports (spawned ones would import Lightning again, ~30 s here)
    torch.multiprocessing.start_processes(_sum_on_rank, args=(str(tmp_path),), nprocs=2, start_method="fork")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"4k-8k": [3.0, 1.0, 1.0], "fineweb": [3.0, 0.75, 3.0]}
    assert list(got[0]) == ["4k-8k", "fineweb"]   # the same order on every rank: the logs' collectives line up
