"""Config loading: defaults <- YAML <- key=value; errors name the key; every experiments/*.yaml loads and builds."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mplus_lightning import config as C
from mplus_lightning.config import ConfigError
from mplus_lightning.fit import main as fit_main

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))
TRAINING = [p for p in EXPERIMENTS if "stage" in OmegaConf.load(p)]   # fit configs (eval configs have no stage)
STAGE1 = Path(__file__).parents[1] / "experiments" / "stage1.yaml"


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
