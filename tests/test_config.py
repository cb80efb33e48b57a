"""Config loading: defaults <- YAML <- key=value; errors name the key; every experiments/*.yaml loads and builds;
one model schema; every field documented (--describe, commented --print-config); the console scripts."""
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest
from lightning import LightningDataModule
from omegaconf import OmegaConf

from mplus_lightning import config as C, fit
from mplus_lightning.config import ConfigError
from mplus_lightning.fit import main as fit_main
from mplus_lightning.model.configuration import MemoryArchitecture, MPlusConfig
from mplus_lightning.typed_config import field_docs

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))
TRAINING = [p for p in EXPERIMENTS if "stage" in OmegaConf.load(p)]   # fit configs (eval configs have no stage)
STAGE1 = Path(__file__).parents[1] / "experiments" / "stage1.yaml"
TINY_LLAMA = {"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16, "num_attention_heads": 2}


def test_overrides_win_over_yaml_and_defaults(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: a\noptim:\n  lr: 0.5\n")
    cfg = C.load(f, ["optim.lr=0.25", "trainer.max_steps=7", "model.llama={hidden_size: 8}"])
    assert cfg.optim.lr == 0.25 and cfg.trainer.max_steps == 7 and cfg.name == "a"
    assert cfg.optim.selector_lr == 1e-4, "untouched keys keep their defaults"


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: a\noptim:\n  learning_rate: 0.5\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        C.load(f)
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        C.load(None, ["name=a", "trainer.max_stepz=3"])


def test_bad_type_is_named():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        C.load(None, ["name=a", "trainer.max_steps=many"])


def test_semantic_checks_name_the_key():
    with pytest.raises(ConfigError, match="step.pass_ratio"):
        C.load(None, ["name=a", "model.llama={hidden_size: 8}", "step.pass_ratio=1.5"])
    with pytest.raises(ConfigError, match="model.num_ltm_blocks"):
        C.load(None, ["name=a", "model.llama={hidden_size: 8}", "stage=ltm"])
    with pytest.raises(ConfigError, match="model.init"):
        C.load(None, ["name=a", "model.init=hub"])


def test_missing_file_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(f)


def test_print_config_shows_the_resolved_values(capsys):
    assert fit_main(["--config", str(STAGE1), "--print-config", "optim.lr=0.125"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.125" in out and "num_contexts_schedule" in out


def test_cli_reports_bad_keys_without_a_traceback(capsys):
    assert fit_main(["--config", str(STAGE1), "trainer.max_stepz=1"]) == 2
    assert "trainer.max_stepz" in capsys.readouterr().err


@pytest.mark.parametrize("path", TRAINING, ids=[p.name for p in TRAINING])
def test_every_experiment_loads_and_round_trips(path, tmp_path):
    cfg = C.load(path)
    assert cfg.name and cfg.stage in C.STAGES
    C.save(cfg, tmp_path / "resolved.yaml")
    assert C.load(tmp_path / "resolved.yaml") == cfg, "the saved resolved config loads back to the same config"


# ---- one model schema -------------------------------------------------------------------------------------------
def test_model_group_and_model_config_share_one_schema():
    shared = {f.name for f in dataclasses.fields(MemoryArchitecture)}
    assert shared <= {f.name for f in dataclasses.fields(C.ModelConfig)}
    assert shared <= {f.name for f in dataclasses.fields(MPlusConfig)}
    assert not shared & set(vars(C.ModelConfig)["__annotations__"]), "the run config declares no memory field again"
    run_defaults = C.ModelConfig().architecture_fields()
    assert run_defaults == MPlusConfig(llama=dict(TINY_LLAMA)).architecture_fields(), "one default per field"
    assert run_defaults["num_ltm_blocks"] == 0 and run_defaults["add_selector"] is False, "stage-1 values"


def test_model_group_converts_to_the_model_config():
    cfg = C.load(None, ["name=a", "model.lora_r=3", "model.lora_alpha=6", "model.num_blocks=7",
                        "model.llama={hidden_size: 8, num_hidden_layers: 2, vocab_size: 16, num_attention_heads: 2}"])
    built = cfg.model.to_mplus_config()
    assert isinstance(built, MPlusConfig)
    assert (built.lora_r, built.lora_alpha, built.num_blocks, built.num_layers) == (3, 6.0, 7, 2)
    assert built.architecture_fields() == cfg.model.architecture_fields()
    other = cfg.model.to_mplus_config(dict(TINY_LLAMA))
    assert other.llama == TINY_LLAMA and other.llama is not TINY_LLAMA, "an explicit llama (from a directory) wins"


# ---- documentation: every field, --describe, --print-config ------------------------------------------------------
def leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", cls, f.name


def test_every_run_config_field_has_a_docstring():
    undocumented = [key for key, cls, name in leaf_keys(C.RunConfig) if not field_docs(cls).get(name)]
    assert not undocumented
    keys = [key for key, _, _ in leaf_keys(C.RunConfig)]
    assert len(keys) >= 60 and "model.lora_alpha" in keys and "trainer.seed" in keys


def test_describe_prints_type_default_and_docstring(capsys):
    assert fit_main(["--describe", "model"]) == 0
    out = capsys.readouterr().out
    assert "model.lora_r: int = 16\n    Rank of the LoRA adapters" in out
    assert "model.num_ltm_blocks: int = 0" in out and "optim." not in out
    assert fit_main(["--describe", "optim.lr"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("optim.lr: float = 4.6e-05\n") and "selector_lr" not in out
    assert fit_main(["--describe"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{key}: " in "\n" + out for key, _, _ in leaf_keys(C.RunConfig)), "--describe alone lists all"
    assert fit_main(["--describe", "modle"]) == 2
    assert "'modle'" in capsys.readouterr().err


@pytest.mark.parametrize("path", TRAINING, ids=[p.name for p in TRAINING])
def test_print_config_comments_each_key_and_loads_back(path, tmp_path, capsys):
    assert fit_main(["--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    lora = lines.index(next(line for line in lines if line.startswith("  lora_r:")))
    assert lines[lora - 1].startswith("  # Rank of the LoRA adapters"), "each key sits under its docstring"
    assert lines[lines.index("model:") - 1].startswith("# The model:"), "each group under its summary"
    assert max(len(line) for line in lines) <= 120
    (tmp_path / "printed.yaml").write_text(printed)
    assert C.load(tmp_path / "printed.yaml") == C.load(path)


# ---- one loader, one registry ------------------------------------------------------------------------------------
def test_run_and_eval_configs_share_one_loader(tmp_path):
    from mplus_lightning.eval import config as E

    assert E.ConfigError is ConfigError
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learnig_rate' .*valid keys in optim: lr, selector_lr"):
        C.load(None, ["name=a", "optim.learnig_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'distancs' of the retention config .*valid keys: model, "):
        E.load_config("retention", overrides=["model=m", "distancs=[1]"])
    for load in (lambda p: C.load(p), lambda p: E.load_config("cost", p)):
        with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
            load(tmp_path / "nope.yaml")


def test_one_datamodule_registry_with_every_kind():
    import mplus_lightning.data as data

    assert not hasattr(data, "DATAMODULE_PATHS")
    assert set(fit.DATAMODULES) == {"synthetic", "fineweb", "slimpajama", "mixture", "facts"}
    kind_doc = field_docs(C.DataConfig)["kind"]
    assert all(kind in kind_doc for kind in fit.DATAMODULES), "DataConfig.kind's docstring names every kind"
    for kind, target in fit.DATAMODULES.items():
        module_name, cls_name = target.split(":")
        assert issubclass(getattr(importlib.import_module(module_name), cls_name), LightningDataModule), kind
    with pytest.raises(ConfigError, match=r"data.kind: 'web' is not one of \['facts', 'fineweb'"):
        fit.build_datamodule(C.load(None, ["name=a", "model.llama={a: 1}", "data.kind=web"]))


# ---- console scripts ---------------------------------------------------------------------------------------------
def command(name: str, module: str) -> list[str]:
    """The installed console script beside this Python, else the same entry point through `python -m`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", module]


def test_console_script_help_lists_the_config_groups():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fit_help = subprocess.run(command("mplus-fit", "mplus_lightning.fit") + ["--help"], capture_output=True,
                              text=True, env=env, timeout=300)
    assert fit_help.returncode == 0, fit_help.stderr
    for group in ("model", "data", "step", "optim", "trainer", "name", "stage", "resume"):
        assert re.search(rf"^  {group} +\S", fit_help.stdout, re.M), group
    assert "--describe" in fit_help.stdout and "usage: mplus-fit" in fit_help.stdout


def test_evaluate_and_export_help(capsys):
    from mplus_lightning.evaluate import main as evaluate_main
    from mplus_lightning.export import main as export_main

    for main, argv in ((evaluate_main, ["--help"]), (evaluate_main, ["retention", "--help"]), (export_main, ["-h"])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mplus-evaluate" in out and "TASK --describe" in out and "usage: mplus-export" in out
    assert re.search(r"^  distances +Score after", out, re.M), "a task's --help lists its keys"


def test_console_scripts_are_declared():
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mplus-fit": "mplus_lightning.fit:main", "mplus-evaluate": "mplus_lightning.evaluate:main",
                       "mplus-export": "mplus_lightning.export:main"}
