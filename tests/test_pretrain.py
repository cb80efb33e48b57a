"""Stage `pretrain` (plain Llama, batches of in-context facts) and the facts data's in_context layout."""
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mplus_lightning import MPlus, config as C, fit
from mplus_lightning.config import ConfigError
from mplus_lightning.data import facts as F
from mplus_lightning.model.configuration import tiny_config
from mplus_lightning.model.mplus import is_memory_parameter
from mplus_lightning.stages.build import build_model, initial_memory

ROOT = Path(__file__).parents[1]
QUIET = ["trainer.progress_bar=false", "trainer.log_every_n_steps=1"]


def data_overrides(corpus_dir):
    return [f"data.params.corpus={corpus_dir}", f"data.params.tokenizer={corpus_dir / 'tokenizer'}"]


def in_context_dm(corpus_dir, **kw):
    return F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), layout="in_context",
                             **{"batch_size": 4, "num_facts": [1, 2, 3], "num_questions": 2, **kw})


def test_in_context_batches_hold_facts_then_questions_with_the_loss_on_answers(corpus_dir):
    dm = in_context_dm(corpus_dir)
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert ids.shape[0] == 4 and ids.shape == mask.shape and mask.dtype == torch.bool
    stream = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    for i in range(4):
        s = stream.sample(i)
        n_facts = sum(len(c) for c in s.contexts)
        n = n_facts + len(s.target)
        assert torch.equal(ids[i, :n], torch.cat([*s.contexts, s.target]))
        assert not mask[i, :n_facts].any() and not mask[i, n:].any(), "no loss on the facts or the padding"
        scored = dm.tokenizer.decode(ids[i][mask[i]])
        assert s.answer in scored and "Recall" not in scored
        assert (ids[i, n:] == dm.tokenizer.eos_token_id).all()
    assert dm.tokenizer.decode(ids[0, :2]).startswith("Fact")


def test_in_context_repeat_samples_copy_the_facts_after_the_instruction(corpus_dir):
    dm = in_context_dm(corpus_dir, repeat_ratio=1.0)
    s = dm.build_train_dataset(rank=0, world_size=1, skip=0).sample(3)
    facts = torch.cat(s.contexts)
    ids, mask = F.in_context_sequence(s)
    assert not s.repeat, "the copy is in the sequence already: the memory step must not build another"
    assert torch.equal(ids[-len(facts):], facts) and mask[-len(facts):].all() and not mask[:-len(facts)].any()
    assert dm.tokenizer.decode(ids[len(facts):-len(facts)]).strip() == F.REPEAT_INSTRUCTION


def test_induction_samples_repeat_a_segment_and_score_only_its_predictable_part():
    rng = random.Random(0)
    for k in range(200):
        s = F.make_induction_sample(rng, (10, 50), length=64)
        ids, mask = F.in_context_sequence(s)
        assert s.contexts == [] and ids.shape == mask.shape == (64,) and ((ids >= 10) & (ids < 50)).all()
        scored = mask.nonzero().flatten().tolist()
        assert 7 <= len(scored) <= 31 and scored == list(range(scored[0], scored[-1] + 1))
        # every scored token is the token that followed an earlier occurrence of its predecessor's segment
        start = scored[0] - 1                     # first token of the second occurrence (not scored: unpredictable)
        offsets = [d for d in range(1, start + 1)
                   if torch.equal(ids[start - d:start - d + len(scored) + 1], ids[start:scored[-1] + 1])]
        assert offsets, "the scored run is a copy of an earlier segment"


def test_induction_warmup_then_a_share_of_induction_samples(corpus_dir):
    dm = in_context_dm(corpus_dir, induction_warmup=3, induction_ratio=0.25)
    low, high = dm.content_token_range()
    assert low > max(dm.tokenizer.all_special_ids) and high == len(dm.tokenizer)
    stream = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    sources = [stream.sample(k).source for k in range(400)]
    assert set(sources[:12]) == {"induction"}, "the first 3 batches of 4"
    share = sources[12:].count("induction") / len(sources[12:])
    assert 0.17 < share < 0.33
    batch = next(iter(dm.train_dataloader()))            # induction samples batch like the facts ones
    assert batch["input_ids"].shape == (4, F.INDUCTION_LENGTH) and batch["loss_mask"].any(dim=1).all()
    assert torch.equal(stream.sample(7).target, dm.build_train_dataset(rank=0, world_size=1, skip=7).sample(7).target)
    with pytest.raises(ValueError, match="in_context"):
        F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), induction_warmup=5)
    with pytest.raises(ValueError, match="induction_ratio"):
        in_context_dm(corpus_dir, induction_ratio=1.5)


def test_fresh_attributes_redraw_every_fact_but_keep_training_names(corpus_dir):
    corpus = F.load_corpus(corpus_dir)
    known = {p.name: p for p in corpus.train}
    dm = in_context_dm(corpus_dir, fresh_attributes=True)
    stream = dm.build_train_dataset(rank=0, world_size=1, skip=0)
    changed = 0
    for k in range(40):
        for chunk in stream.sample(k).contexts:
            text = dm.tokenizer.decode(chunk)
            name = next(n for n in known if f" {n} " in text)
            changed += text.strip() != known[name].fact()
    assert changed > 30, "most facts differ from the corpus' fixed attributes"
    a, b = stream.sample(7), dm.build_train_dataset(rank=0, world_size=1, skip=7).sample(7)
    assert all(torch.equal(x, y) for x, y in zip(a.contexts, b.contexts)), "still a function of (seed, rank, k)"


def test_layouts_and_stages_must_match(corpus_dir):
    with pytest.raises(ValueError, match="layout must be"):
        F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), layout="stacked")
    with pytest.raises(ValueError, match="one sample per step"):
        F.FactsDataModule(str(corpus_dir), str(corpus_dir / "tokenizer"), batch_size=8)
    pre = C.load(ROOT / "experiments" / "demo_pretrain.yaml", data_overrides(corpus_dir))
    with pytest.raises(ConfigError, match="layout=in_context"):
        fit.check_layout(pre, fit.build_datamodule(C.load(ROOT / "experiments" / "tiny.yaml")))
    s1 = C.load(ROOT / "experiments" / "demo_stage1.yaml", data_overrides(corpus_dir))
    with pytest.raises(ConfigError, match="layout=memory"):
        fit.check_layout(s1, fit.build_datamodule(pre))
    fit.check_layout(pre, fit.build_datamodule(pre))
    fit.check_layout(s1, fit.build_datamodule(s1))


def test_plain_lm_loss_is_the_backbones_masked_next_token_loss():
    torch.manual_seed(0)
    model = MPlus(tiny_config(num_ltm_blocks=0))
    model.train_backbone_only()
    ids = torch.randint(3, model.llama.config.vocab_size, (3, 12))
    mask = torch.rand(3, 12) < 0.5
    mask[:, 0] = False
    loss, count, hits = model.plain_lm_loss(ids, mask)
    logits = model.backbone_logits(ids)[:, :-1]
    scored = mask[:, 1:]
    want = torch.nn.functional.cross_entropy(logits[scored], ids[:, 1:][scored])
    assert count == scored.sum() and torch.allclose(loss, want, atol=1e-6)
    assert hits == (logits[scored].argmax(-1) == ids[:, 1:][scored]).sum()

    loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == (not is_memory_parameter(name)), name
    assert model.llama.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if is_memory_parameter(n))


@pytest.mark.slow
def test_pretrain_exports_weights_that_stage1_starts_from_with_a_fresh_pool(tmp_path, corpus_dir, caplog):
    small = ["trainer.max_steps=3", "trainer.ckpt_every_n_steps=3", "trainer.val_every_n_steps=3",
             "trainer.val_batches=1", "data.params.val_samples=4", "data.params.batch_size=4", f"run_dir={tmp_path}"]
    pre = C.load(ROOT / "experiments" / "demo_pretrain.yaml", data_overrides(corpus_dir) + QUIET + small)
    fit.run(pre)
    export = pre.out_dir / "export"
    assert (export / "config.json").is_file() and not (export / "memory").exists()
    weights = load_file(str(export / "model.safetensors"))
    torch.manual_seed(pre.trainer.seed)
    start = MPlus(pre.model.to_mplus_config())
    emb = next(k for k in weights if k.endswith("embed_tokens.weight"))
    assert not torch.equal(weights[emb], start.state_dict()[emb]), "pretraining moved the weights"

    s1 = C.load(ROOT / "experiments" / "demo_stage1.yaml",
                data_overrides(corpus_dir) + QUIET + [f"init_from={export}", f"run_dir={tmp_path}",
                                                      "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2",
                                                      "trainer.val_every_n_steps=1000"])
    model = build_model(s1)
    assert torch.equal(model.state_dict()[emb], weights[emb])
    with caplog.at_level("INFO", logger="mplus_lightning.stages.build"):
        memory = initial_memory(s1, model, seed=0)
    assert not memory.initialized and "no memory" in caplog.text
    fit.run(s1)
    assert (s1.out_dir / "export" / "memory").is_dir()


@pytest.mark.slow
def test_pretrain_resume_continues_exactly(tmp_path, corpus_dir):
    from tests.test_training import scalars

    def cfg(name, *extra):
        return C.load(ROOT / "experiments" / "demo_pretrain.yaml",
                      data_overrides(corpus_dir) + QUIET + [f"name={name}", f"run_dir={tmp_path}",
                                                            "data.params.batch_size=4",
                                                            "trainer.val_every_n_steps=1000", *extra])
    fit.run(cfg("straight", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2"))
    fit.run(cfg("resumed", "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2"))
    fit.run(cfg("resumed", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2", "resume=last"))
    a, b = scalars(tmp_path / "straight", "train/loss"), scalars(tmp_path / "resumed", "train/loss")
    assert len(a) == 4 and set(a) == set(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step


@pytest.mark.slow
@pytest.mark.multirank
def test_pretrain_shards_with_fsdp2_on_two_ranks(tmp_path, corpus_dir):
    import subprocess
    import sys

    args = [sys.executable, "-m", "mplus_lightning.fit", "--config", str(ROOT / "experiments" / "demo_pretrain.yaml"),
            *data_overrides(corpus_dir), *QUIET, f"run_dir={tmp_path}", "trainer.strategy=fsdp2", "trainer.devices=2",
            "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2", "trainer.val_every_n_steps=1000",
            "data.params.batch_size=4"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    export = tmp_path / "pretrain" / "export"
    assert (export / "model.safetensors").is_file() and not (export / "memory").exists()
    assert MPlus.from_pretrained(export).config.num_layers == 2
