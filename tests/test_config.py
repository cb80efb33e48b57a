"""Config loading: defaults <- YAML <- key=value; errors name the key; every experiments/*.yaml loads and builds;
one model schema; every field documented (--describe, commented --print-config); the console scripts."""
import dataclasses
import importlib
import inspect
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
    assert out.startswith("optim.lr: float = 0.000368\n") and "selector_lr" not in out, "the official stage-1 rate"
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
    assert fit.DATAMODULES is C.DATAMODULES, "fit uses the config's registry"
    assert set(fit.DATAMODULES) == {"synthetic", "fineweb", "slimpajama", "mixture", "facts"}
    kind_doc = field_docs(C.DataConfig)["kind"]
    assert all(kind in kind_doc for kind in fit.DATAMODULES), "DataConfig.kind's docstring names every kind"
    for kind, target in fit.DATAMODULES.items():
        module_name, cls_name = target.split(":")
        assert issubclass(getattr(importlib.import_module(module_name), cls_name), LightningDataModule), kind
    with pytest.raises(ConfigError, match=r"data.kind: 'web' is not one of \['facts', 'fineweb'"):
        fit.build_datamodule(C.load(None, ["name=a", "model.llama={a: 1}", "data.kind=web"]))


# ---- typed data parameters ---------------------------------------------------------------------------------------
def constructor_parameters(cls) -> dict:
    """name -> default (inspect.Parameter.empty when required) of a DataModule's constructor, with the
    `SampleDataModule` options its **kwargs forwards."""
    from mplus_lightning.data.stream import SampleDataModule

    out = {}
    for name, p in inspect.signature(cls).parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(constructor_parameters(SampleDataModule))
        else:
            out[name] = p.default
    return out


@pytest.mark.parametrize("kind", sorted(fit.DATAMODULES))
def test_each_data_kind_schema_is_its_constructor(kind):
    from mplus_lightning.data.sample import SampleRule

    cls = C.datamodule_class(kind)
    schema = cls.params_schema
    declared = constructor_parameters(cls)
    assert [f.name for f in dataclasses.fields(schema)] and {f.name for f in dataclasses.fields(schema)} == set(
        declared), "the schema has exactly the constructor's parameters"
    assert all(field_docs(schema).get(f.name) for f in dataclasses.fields(schema)), "every parameter documented"
    defaults = dataclasses.asdict(schema())
    required = {n: 512 if n == "vocab_size" else "unused" for n, d in declared.items() if d is inspect.Parameter.empty}
    for name, default in declared.items():
        if name == "rule":   # the constructor's None is the kind's own rule
            assert SampleRule(**defaults["rule"]) == cls(**{**defaults, **required, "rule": None}).rule, kind
        elif default is inspect.Parameter.empty:
            assert defaults[name] is None, f"{kind}: required {name} is null until set"
        else:
            want = list(default) if isinstance(default, tuple) else default
            assert defaults[name] == want or (name == "ratios" and defaults[name] == resolved_ratios(default)), name


def resolved_ratios(preset):
    from mplus_lightning.data.mixture import resolve_ratios
    return resolve_ratios(preset)


def test_data_params_unknown_keys_and_wrong_types_are_named_at_load():
    with pytest.raises(ConfigError, match=r"^data\.params\.pth: unknown key for data\.kind=fineweb "
                                          r"\(known: path, tokenizer, name, dump, text_field, val_docs,"):
        C.load(STAGE1, ["data.params.pth=/data/fineweb"])
    with pytest.raises(ConfigError, match=r"^data\.params\.val_docs: .*'many'.* \(data\.kind=fineweb\)"):
        C.load(STAGE1, ["data.params.val_docs=many"])
    with pytest.raises(ConfigError, match=r"^data\.params\.rule\.min_lenght: unknown key .*\(known: min_length, "):
        C.load(STAGE1, ["data.params.rule.min_lenght=8"])
    with pytest.raises(ConfigError, match=r"^data\.params\.num_facts\[1\]: .*'many'.*data\.kind=facts"):
        C.load(None, ["name=a", "model.llama={a: 1}", "data.kind=facts", "data.params.num_facts=[1, many]"])
    ltm = STAGE1.parent / "ltm.yaml"
    with pytest.raises(ConfigError, match=r"data\.params \(data\.kind=mixture\): ratios: unknown source.*'web'"):
        C.load(ltm, ["data.params.ratios={web: 1.0}"])
    with pytest.raises(ConfigError, match=r"data\.kind=synthetic \(known: num_docs, "):
        C.load(STAGE1, ["data.kind=synthetic"])   # another kind: the fine-web parameters are unknown to it


def test_data_params_resolve_to_every_parameter_of_the_kind():
    cfg = C.load(STAGE1.parent / "tiny.yaml")
    schema = C.datamodule_class("synthetic").params_schema
    assert list(cfg.data.params) == [f.name for f in dataclasses.fields(schema)]
    assert cfg.data.params["num_docs"] == 512 and cfg.data.params["prefetch_factor"] == 2, "set and default"
    assert cfg.data.params["rule"] == {"min_length": 8, "max_length": 32, "max_seq_length": 64,
                                       "target_is_context_ratio": 0.1, "pipeline": "stage1"}
    mixture = C.load(STAGE1.parent / "stage2.yaml", ["data.params.ratios=stage3"])
    assert mixture.data.params["ratios"] == {"fineweb": 0.9, "4k-8k": 0.025, "8k-16k": 0.025, "16k-32k": 0.025,
                                             "32k-64k": 0.025}, "a preset shows resolved"
    assert mixture.data.params["rule"]["pipeline"] == "stage2_3", "the mixture's own rule"


def test_resolved_data_params_build_the_same_datamodule(tmp_path):
    cfg = C.load(STAGE1.parent / "stage2.yaml", [f"data.params.fineweb={tmp_path}", f"data.params.buckets={tmp_path}",
                                                 f"data.params.tokenizer={tmp_path}", "data.params.on_exhausted=stop"])
    dm = fit.build_datamodule(cfg)
    assert dm.num_epochs == 1, "on_exhausted=stop ends the stream although num_epochs (null) is passed too"
    assert dm.rule.pipeline == "stage2_3" and dm.fineweb.max_train_docs == 200_000
    assert fit.build_datamodule(C.load(STAGE1.parent / "stage2.yaml", [
        f"data.params.fineweb={tmp_path}", f"data.params.buckets={tmp_path}",
        f"data.params.tokenizer={tmp_path}"])).num_epochs is None, "cycle: endless"


@pytest.mark.parametrize("path", TRAINING, ids=[p.name for p in TRAINING])
def test_print_config_shows_each_data_parameter_under_its_docstring(path, capsys):
    assert fit_main(["--config", str(path), "--print-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("  params:")
    cfg = C.load(path)
    docs = field_docs(C.datamodule_class(cfg.data.kind).params_schema)
    for name in cfg.data.params:
        line = next(i for i in range(start, len(lines)) if lines[i].startswith(f"    {name}:"))
        top = line
        while lines[top - 1].startswith("    # "):
            top -= 1
        comment = "".join(text.strip().removeprefix("#") for text in lines[top:line])
        assert comment, f"{name} has no comment"
        if name != "rule":   # a nested group sits under its class's summary
            assert comment.replace(" ", "") == docs[name].replace(" ", ""), name


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
