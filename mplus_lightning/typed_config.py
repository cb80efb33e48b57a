"""Typed configs from dataclasses, shared by the run config (`config.load`) and the evaluation configs
(`eval.config.load_config`): one loader (defaults <- YAML <- flags <- `key=value`, with errors that name the source and
the key), field documentation read from the docstring under each dataclass field (`describe`, `--describe`), and YAML
with that documentation as a comment above each key (`to_commented_yaml`, `--print-config`), which loads back.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

WIDTH = 120
"""Line length of `describe` and `to_commented_yaml` output."""


class ConfigError(ValueError):
    """A configuration problem (file, key or value); the message names it."""


def show_traceback(debug_flag: bool) -> bool:
    """Whether a user's mistake keeps its traceback: `--debug` or MPLUS_DEBUG=1 (else the tools print one line)."""
    return debug_flag or os.environ.get("MPLUS_DEBUG") == "1"


# ---- loading --------------------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> tuple[str, DictConfig]:
    """(source name, contents) of a YAML config file, for `merge`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (not found from {Path.cwd()}; experiments/ holds the "
                          "shipped ones)")
    try:
        return str(path), OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors come in several types
        raise ConfigError(f"{path} is not valid YAML: {_first_line(e)}") from None


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[str, DictConfig]:
    """(source name, contents) of `a.b=value` command-line overrides, for `merge`."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    try:
        return "key=value overrides", OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"key=value overrides: {_first_line(e)}") from None


def merge(schema: type, sources: list[tuple[str, Any]], *, what: str, missing_hint: str = "{key}=...") -> Any:
    """The dataclass instance of `schema` with `sources` [(name, mapping), ...] merged over its defaults in order.

    Errors name the source, the full key and (for unknown keys) the keys valid there. `what` names the config in
    messages ("run config"); `missing_hint` says how to set a required key, formatted with `key`.
    """
    cfg = OmegaConf.structured(schema)
    for name, layer in sources:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            key = _key(e)
            if " not in " in str(e):
                raise ConfigError(f"{name}: unknown key {key!r} of the {what} (valid keys{_where(key)}: "
                                  f"{', '.join(_valid_keys(schema, key))})") from None
            raise ConfigError(f"{name}: bad value for key {key!r} of the {what}: {_first_line(e)}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = _key(e)
        if "missing mandatory value" in str(e).lower():
            raise ConfigError(f"the {what} needs `{key}` (e.g. {missing_hint.format(key=key)})") from None
        raise ConfigError(f"{what} key {key!r}: {_first_line(e)}") from None


def _key(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", None) or "")


def _first_line(e: Exception) -> str:
    return str(e).split("\n")[0]


def _where(key: str) -> str:
    return f" in {key.rsplit('.', 1)[0]}" if "." in key else ""


def _valid_keys(schema: type, key: str) -> list[str]:
    """The field names of the (nested) dataclass that `key` was looked up in."""
    cls = schema
    for part in key.split(".")[:-1]:
        hint = _type_hints(cls).get(part)
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            break
        cls = hint
    return [f.name for f in dataclasses.fields(cls)]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ---- documentation --------------------------------------------------------------------------------------------------
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass and its bases: the string literal right under each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):   # no source (e.g. a dataclass built at run time): no docs
            continue
        body = tree.body[0].body
        for stmt, following in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def class_summary(cls: type) -> str:
    """The first sentence of a dataclass's own docstring."""
    return first_sentence(" ".join((cls.__doc__ or "").split()) if "__doc__" in vars(cls) else "")


def first_sentence(text: str) -> str:
    """`text` up to its first full stop (which is dropped; an ellipsis stays)."""
    head = text.split(". ")[0]
    return head[:-1] if head.endswith(".") and not head.endswith("..") else head


def _groups(schema: type) -> dict[str, type]:
    return {name: hint for name, hint in _type_hints(schema).items()
            if isinstance(hint, type) and dataclasses.is_dataclass(hint)}


def summary(schema: type, indent: int = 2) -> str:
    """One line per top-level key of `schema`: its groups (nested dataclasses) first, then the plain keys."""
    groups, docs = _groups(schema), field_docs(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    width = max(len(n) for n in names) + 2
    lines = [f"{' ' * indent}{n:<{width}}{class_summary(groups[n])}" for n in names if n in groups]
    lines += [f"{' ' * indent}{n:<{width}}{first_sentence(docs.get(n, ''))}" for n in names if n not in groups]
    return "\n".join(line if len(line) <= WIDTH else line[:WIDTH - 4].rsplit(" ", 1)[0] + " ..." for line in lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _inline(value: Any) -> str:
    if value == MISSING:
        return "(required)"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))


def describe(schema: type, prefix: str | None = None) -> str:
    """Every field of `schema` (or of the group / key `prefix`, e.g. `model` or `optim.lr`): its dotted key, type,
    default and docstring."""
    lines: list[str] = []

    def walk(cls: type, path: str) -> None:
        docs, groups = field_docs(cls), _groups(cls)
        for f in dataclasses.fields(cls):
            key = f"{path}{f.name}"
            wanted = prefix is None or key == prefix or key.startswith(prefix + ".") or prefix.startswith(key + ".")
            if not wanted:
                continue
            if f.name in groups:
                if prefix is None or not prefix.startswith(key + "."):
                    lines.append(f"{key}: {class_summary(groups[f.name])}")
                walk(groups[f.name], key + ".")
                continue
            lines.extend(textwrap.wrap(f"{key}: {_type_name(f)} = {_inline(_default(f))}", WIDTH,
                                       subsequent_indent="        "))
            doc = docs.get(f.name, "(undocumented)")
            lines.extend(textwrap.wrap(doc, WIDTH, initial_indent="    ", subsequent_indent="    "))

    walk(schema, "")
    if not lines:
        raise ConfigError(f"no config key or group {prefix!r}; the top-level ones are "
                          f"{', '.join(f.name for f in dataclasses.fields(schema))}")
    return "\n".join(lines) + "\n"


def to_commented_yaml(cfg: Any) -> str:
    """The YAML of a config dataclass instance with each field's docstring as a comment above its key; it loads back
    to the same config (comments are ignored by YAML)."""
    return "\n".join(_commented(cfg, 0)) + "\n"


def _commented(obj: Any, indent: int) -> list[str]:
    pad, docs, lines = " " * indent, field_docs(type(obj)), []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        doc = class_summary(type(value)) if dataclasses.is_dataclass(value) else docs.get(f.name, "")
        if doc:
            lines.extend(textwrap.wrap(doc, WIDTH, initial_indent=pad + "# ", subsequent_indent=pad + "# "))
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.extend(_commented(value, indent + 2))
        else:
            text = OmegaConf.to_yaml(OmegaConf.create({f.name: value}))
            lines.extend(pad + line for line in text.splitlines())
    return lines
