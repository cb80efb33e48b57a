"""Every training config in experiments/ builds (model, memory, data, trainer) without training.

The full-size configs point at Llama-3.1-8B and real datasets; here their paths are redirected to tiny stand-ins in
the real formats (a tiny HF Llama directory, fineweb parquet, built SlimPajama buckets, a tiny tokenizer). The memory
shapes stay the real ones (12,800 -> 10,240 rows per layer), so the stage-3 transition runs at full pool size.
"""
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from mplus_lightning import MPlus, config as C, fit
from mplus_lightning.model.configuration import MPlusConfig
from mplus_lightning.stages import module_for
from mplus_lightning.stages.build import build_model, initial_memory

from .test_data_common import slim_built, slim_src, texts, tok, tok_dir, write_parquet  # noqa: F401 (fixtures)

ROOT = Path(__file__).parents[1]
FULL = ["stage1.yaml", "stage2.yaml", "ltm.yaml", "ltm_2x8.yaml"]
TINY = ["tiny.yaml", "tiny_stage2.yaml", "tiny_ltm.yaml"]
LLAMA = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, slim_built, tok_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("standins")
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(root / "llama")
    write_parquet(root / "fw" / "data" / "CC-MAIN-2024-10" / "train-0.parquet", texts(60, seed=6, hi=900))
    write_parquet(root / "fw" / "data" / "CC-MAIN-2023-50" / "train-0.parquet", texts(60, seed=7, hi=900))
    # previous-stage exports at the real memory shape (K=256, 50 blocks) on the tiny backbone
    MPlus(MPlusConfig(llama=LLAMA, num_tokens=256, num_blocks=50, num_ltm_blocks=0, add_selector=False, lora_r=2,
                      selector_hidden_dim=8)).save_pretrained(root / "stage1_export",
                                                             memory=None)
    s2 = MPlus(MPlusConfig(llama=LLAMA, num_tokens=256, num_blocks=50, num_ltm_blocks=0, add_selector=True, lora_r=16,
                           selector_hidden_dim=256))
    mem = s2.new_memory()
    mem.initialized = True
    s2.save_pretrained(root / "stage2_export", memory=mem)
    return {"root": root, "buckets": slim_built, "tok": tok_dir}


def redirect(name: str, s: dict, tmp_path: Path) -> list[str]:
    cfg = OmegaConf.load(ROOT / "experiments" / name)
    out = [f"run_dir={tmp_path}", "trainer.devices=1", "trainer.num_nodes=1", "trainer.strategy=auto",
           "trainer.accelerator=cpu", "trainer.precision=32-true"]
    if cfg.model.init == "llama":
        out.append(f"model.path={s['root'] / 'llama'}")
    if cfg.stage == "stage2":
        out.append(f"init_from={s['root'] / 'stage2_export'}")   # a stage-1-shaped pool (no LTM)
    if cfg.stage == "ltm":
        out.append(f"init_from={s['root'] / 'stage2_export'}")
    params = cfg.data.params
    if "path" in params:
        out.append(f"data.params.path={s['root'] / 'fw'}")
    if "fineweb" in params:
        out.append(f"data.params.fineweb={s['root'] / 'fw'}")
    if "buckets" in params:
        out.append(f"data.params.buckets={s['buckets']}")
    if "tokenizer" in params:
        out.append(f"data.params.tokenizer={s['tok']}")
    if cfg.data.kind in ("fineweb", "mixture"):   # the stand-in dumps hold 60 documents
        out += ["data.params.val_docs=5", "data.params.val_size=2", "data.params.train_start=0",
                "data.params.max_train_docs=null", "data.params.progress=false", "data.params.num_workers=0"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL + TINY)
def test_every_training_config_builds(name, stand_ins, tmp_path):
    cfg = C.load(ROOT / "experiments" / name, redirect(name, stand_ins, tmp_path))
    if name in TINY and cfg.init_from:
        cfg.init_from = None     # tiny stages chain through `make tiny`; here each builds from scratch
    datamodule = fit.build_datamodule(cfg)
    module = module_for(cfg.stage)(cfg, fit.instruction_ids(cfg, datamodule))
    model = module.model
    assert model.config.num_tokens == cfg.model.num_tokens
    assert model.config.stm_rows == (cfg.model.num_blocks - cfg.model.num_ltm_blocks) * cfg.model.num_tokens
    memory = initial_memory(cfg, model, seed=0)
    memory.check_compatible(model.config)
    if cfg.stage == "ltm" and cfg.init_from:
        assert memory.size == 10_240 and len(memory.ltm) == 2_560, "the 2,560 oldest rows moved into the LTM"
    datamodule.prepare_data()
    datamodule.setup("fit")
    sample = next(iter(datamodule.train_dataloader()))
    assert sample.contexts and sample.target.numel() > 0
    assert int(max(int(c.max()) for c in sample.contexts)) < model.config.llama["vocab_size"]
    fit.build_trainer(cfg)


def test_two_node_config_is_the_one_node_config_on_two_nodes():
    one = OmegaConf.to_container(OmegaConf.load(ROOT / "experiments" / "ltm.yaml"))
    two = OmegaConf.to_container(OmegaConf.load(ROOT / "experiments" / "ltm_2x8.yaml"))
    assert two["trainer"].pop("num_nodes") == 2 and one["trainer"].pop("num_nodes") == 1
    assert two.pop("name") == "ltm-2x8" and one.pop("name") == "ltm"
    assert one == two


def test_missing_paths_are_named(tmp_path):
    cfg = C.load(ROOT / "experiments" / "stage1.yaml", [f"run_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="model.path"):
        module_for(cfg.stage)(cfg, [5])
    cfg = C.load(ROOT / "experiments" / "stage1.yaml", [f"run_dir={tmp_path}", f"model.path={tmp_path}"])
    with pytest.raises(C.ConfigError, match="data.params.path, data.params.tokenizer must be set"):
        fit.build_datamodule(cfg)


# The model each shipped recipe builds (MPlusConfig's memory and adapter fields), as recorded while the run config
# and the model config still had separate defaults: a recipe that leans on a default must keep building this model.
# num_tokens, num_blocks, num_ltm_blocks, add_selector, add_encoder_retriever, selector_hidden_dim,
# num_selector_layers, lora_r, lora_alpha, lora_dropout, ltm_capacity
BUILT = {
    "stage1.yaml": (256, 50, 0, False, True, 256, 2, 16, 32.0, 0.1, 153_600),
    "stage2.yaml": (256, 50, 0, True, True, 256, 2, 16, 32.0, 0.1, 153_600),
    "ltm.yaml": (256, 50, 10, True, True, 256, 2, 16, 32.0, 0.1, 153_600),
    "ltm_2x8.yaml": (256, 50, 10, True, True, 256, 2, 16, 32.0, 0.1, 153_600),
    "tiny.yaml": (8, 6, 0, False, True, 16, 2, 4, 8.0, 0.0, 256),
    "tiny_stage2.yaml": (8, 6, 0, True, True, 16, 2, 4, 8.0, 0.0, 256),
    "tiny_ltm.yaml": (8, 6, 2, True, True, 16, 2, 4, 8.0, 0.0, 256),
    "demo_pretrain.yaml": (6, 8, 0, False, True, 32, 2, 8, 16.0, 0.0, 1024),
    "demo_stage1.yaml": (6, 8, 0, False, True, 32, 2, 8, 16.0, 0.0, 1024),
    "demo_stage2.yaml": (6, 8, 0, True, True, 32, 2, 8, 16.0, 0.0, 1024),
    "demo_ltm.yaml": (6, 8, 2, True, True, 32, 2, 8, 16.0, 0.0, 1024),
}


def test_every_training_recipe_is_pinned():
    assert set(BUILT) == {p.name for p in (ROOT / "experiments").glob("*.yaml") if "stage" in OmegaConf.load(p)}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_each_recipe_builds_the_model_config_it_always_built(name):
    cfg = C.load(ROOT / "experiments" / name)
    built = cfg.model.to_mplus_config(None if cfg.model.llama else LLAMA)
    assert tuple(built.architecture_fields().values()) == BUILT[name]
    assert built.llama == (cfg.model.llama or LLAMA)
    assert (built.drop_memory_per_layer, built.two_adapters) == (True, True), "fields no run config sets"


def test_build_model_uses_the_one_conversion():
    cfg = C.load(ROOT / "experiments" / "tiny_ltm.yaml", ["init_from=null"])
    assert build_model(cfg).config == cfg.model.to_mplus_config()


# The official data recipe (which fine-web dump, the held-out and training document ranges, the mix, the long
# documents' chunk length) that each full-size config states explicitly.
RULE = {"min_length": 16, "max_length": 512, "max_seq_length": 2048, "target_is_context_ratio": 0.1}
MIX_STAGE2 = {"fineweb": 0.2, "4k-8k": 0.2, "8k-16k": 0.2, "16k-32k": 0.2, "32k-64k": 0.2}
MIX_STAGE3 = {"fineweb": 0.9, "4k-8k": 0.025, "8k-16k": 0.025, "16k-32k": 0.025, "32k-64k": 0.025}
OFFICIAL_DATA = {
    "stage1.yaml": ("fineweb", "CC-MAIN-2024-10", 50_000, 1_000, 0, 3_000_000, None, {**RULE, "pipeline": "stage1"}),
    "stage2.yaml": ("mixture", "CC-MAIN-2024-10", 50_000, 1_000, 0, 200_000, MIX_STAGE2,
                    {**RULE, "pipeline": "stage2_3"}),
    "ltm.yaml": ("mixture", "CC-MAIN-2023-50", 50_000, 1_000, 720_000, 720_000, MIX_STAGE3,
                 {**RULE, "pipeline": "stage2_3"}),
    "ltm_2x8.yaml": ("mixture", "CC-MAIN-2023-50", 50_000, 1_000, 720_000, 720_000, MIX_STAGE3,
                     {**RULE, "pipeline": "stage2_3"}),
}


@pytest.mark.parametrize("name", FULL)
def test_full_size_configs_state_the_official_data_recipe(name):
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "experiments" / name))["data"]["params"]
    kind, dump, val_docs, val_size, train_start, max_train_docs, ratios, rule = OFFICIAL_DATA[name]
    stated = {"dump": dump, "val_docs": val_docs, "val_size": val_size, "train_start": train_start,
              "max_train_docs": max_train_docs, "rule": rule}
    if ratios is not None:
        stated.update(ratios=ratios, longdoc_min_length=384)
    assert {k: raw.get(k) for k in stated} == stated, "written in the YAML, not left to defaults"
    assert C.load(ROOT / "experiments" / name).data.kind == kind


SCHEDULE_STAGES_1_2 = [[0, 50], [100_000, 100], [200_000, 200]]
OFFICIAL_STEP = {   # full_context, multi_chunk, pass, empty_prob, one-chunk gradient, retriever loss, chunk schedule
    "stage1.yaml": (0.1, 0.8, 0.8, 1.0, True, False, SCHEDULE_STAGES_1_2),
    "stage2.yaml": (0.05, 0.9, 0.8, 1.0, True, True, SCHEDULE_STAGES_1_2),
    "ltm.yaml": (0.05, 0.8, 0.8, 0.2, False, True, [[0, 100], [20_000, 200]]),
    "ltm_2x8.yaml": (0.05, 0.8, 0.8, 0.2, False, True, [[0, 100], [20_000, 200]]),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_STEP))
def test_the_full_size_configs_state_the_official_step_recipe_of_their_stage(name):
    s = C.load(ROOT / "experiments" / name).step
    assert (s.full_context_ratio, s.multi_chunk_ratio, s.pass_ratio, s.empty_prob, s.single_chunk_gradient,
            s.retriever_loss, s.num_contexts_schedule) == OFFICIAL_STEP[name]
    assert s.revisit is True
