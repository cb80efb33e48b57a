"""The evaluation configs: experiments/eval_*.yaml hold exactly the defaults; precedence; errors name the key;
every key documented (--describe, commented --print-config)."""

import dataclasses

import pytest
import torch

from mplus_lightning.eval.config import TASKS, ConfigError, default_yaml, load_config
from mplus_lightning.eval.runtime import resolve_dtype
from mplus_lightning.evaluate import main
from mplus_lightning.typed_config import field_docs


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


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_eval_config_field_has_a_docstring(task):
    docs = field_docs(TASKS[task])
    assert [f.name for f in dataclasses.fields(TASKS[task]) if not docs.get(f.name)] == []


@pytest.mark.parametrize("task", sorted(TASKS))
def test_print_config_is_commented_yaml_that_loads_back(task, tmp_path, capsys):
    assert main([task, "--print-config", "--model", "m", "seed=7"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[lines.index("model: m") - 1].startswith("# Model directory"), "each key sits under its docstring"
    (tmp_path / "printed.yaml").write_text(printed)
    again = load_config(task, tmp_path / "printed.yaml", use_default_yaml=False)
    assert again == load_config(task, overrides=["model=m", "seed=7"]) and again.seed == 7


def test_describe_lists_a_task_config(capsys):
    assert main(["retention", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "max_new_tokens: int = 10\n    Greedy tokens generated per answer" in out
    assert "model: str = (required)" in out
    assert main(["longbench", "--describe", "max_new_tokens"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("max_new_tokens: dict[str, int] = {") and "subsets" not in out
    assert main(["cost", "--describe", "distances"]) == 2
    assert "no config key or group 'distances'" in capsys.readouterr().err


FLAGS = [(["--limit", "3"], "limit", 3), (["--device", "cpu"], "device", "cpu"), (["--dtype", "fp16"], "dtype", "fp16"),
         (["--tokenizer", "tok"], "tokenizer", "tok"), (["--out", "o"], "out", "o"), (["--data", "d"], "data", "d"),
         (["--overwrite"], "overwrite", True), (["--no-progress"], "progress", False)]


@pytest.mark.parametrize("argv, key, value", FLAGS, ids=[f[1] for f in FLAGS])
def test_each_command_line_flag_reaches_the_config(argv, key, value, tmp_path, capsys):
    assert main(["retention", "--model", "m", *argv, "--print-config"]) == 0
    (tmp_path / "c.yaml").write_text(capsys.readouterr().out)
    assert getattr(load_config("retention", tmp_path / "c.yaml", use_default_yaml=False), key) == value


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("fp32", torch.float32),
                                         ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                         ("float16", torch.float16), ("fp16", torch.float16)])
def test_dtype_names_resolve(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) is dtype
