"""The evaluation configs: experiments/eval_*.yaml hold exactly the defaults; precedence; errors name the key."""

import dataclasses

import pytest

from mplus_lightning.eval.config import TASKS, ConfigError, default_yaml, load_config


@pytest.mark.parametrize("task", sorted(TASKS))
def test_yaml_holds_the_dataclass_defaults(task):
    assert default_yaml(task).is_file()
    from_yaml = load_config(task, overrides=["model=m"])
    from_code = load_config(task, overrides=["model=m"], use_default_yaml=False)
    assert from_yaml == from_code
    assert isinstance(from_yaml, TASKS[task]) and dataclasses.is_dataclass(from_yaml)


def test_precedence_yaml_then_flags_then_overrides(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("num_items: 7\nseed: 3\ndistances: [0, 5]\n")
    cfg = load_config("retention", y, ["seed=4"], {"model": "m", "data": "d", "limit": None})
    assert (cfg.num_items, cfg.seed, cfg.distances, cfg.model, cfg.data) == (7, 4, [0, 5], "m", "d")
    assert cfg.max_new_tokens == 10                      # untouched keys keep their defaults
    cfg = load_config("longbench", overrides=["model=m", "max_new_tokens.hotpotqa=5", "max_length=16384"])
    assert cfg.max_new_tokens["hotpotqa"] == 5 and cfg.max_new_tokens["qasper"] == 128 and cfg.max_length == 16384


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'distance'"):
        load_config("retention", overrides=["model=m", "distance=[1]"])
    with pytest.raises(ConfigError, match="'max_new_tokens'"):
        load_config("retention", overrides=["model=m", "max_new_tokens=ten"])
    with pytest.raises(ConfigError, match="needs `model`"):
        load_config("cost")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("cost", overrides=["model"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("cost", tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lengths: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("cost", bad, ["model=m"])
    with pytest.raises(ConfigError, match="unknown task"):
        load_config("perplexity")
