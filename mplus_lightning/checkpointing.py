"""Checkpoint units: each training checkpoint is one folder, written atomically and verified before it is read.

    <run>/checkpoints/step=000000040/
      model.ckpt            Lightning's checkpoint: weights, optimizer, scheduler, step, data position (with
                            trainer.strategy=fsdp2 a folder of shards); a frozen backbone is named and fingerprinted,
                            not stored (`FrozenBackbone`)
      rank0.safetensors     rank 0's memory and step state: tensors, the rest as JSON in the header (one file per
      rank1.safetensors     rank: ranks hold different memories)
      manifest.json         written last: the step, the save's id, the size and sha256 of every other file

Writing: every file goes into `step=N.tmp/`, then the manifest (checksums read back from the disk: each rank reads its
own state file, rank 0 the rest), then one rename to `step=N/` commits the unit. A run killed at any instant leaves
the previous units complete and at most a `.tmp` folder that nothing reads. Pruning renames a unit to `.deleting`
before removing it, and only after a newer unit is committed.

Reading: every file is checked against the manifest (size, then sha256) before a resume or an export uses it, so a
damaged file is refused by name, with the intact earlier units to use instead (each process hashes what it reads:
Lightning's checkpoint and one rank's state). Lightning's checkpoint and every rank's state carry the step and the
save's random id, so files of two different saves are never combined. Nothing read here can run code: rank states
are safetensors + JSON, Lightning's checkpoint is read with `torch.load(weights_only=True)`, and a sharded
checkpoint's pickled index is checked against an allow-list first.
Paths into the run folder are never stored, so a run folder can be moved or copied and resumed from (a frozen
backbone's source directory is recorded for an export only: a resume takes it from the run's config).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .typed_config import ConfigError

MODEL = "model.ckpt"
MANIFEST = "manifest.json"
FORMAT = "mplus_lightning.checkpoint/1"
RANK_STATE_FORMAT = "mplus_lightning.rank_state/1"
UNIT_KEY = "mplus_unit"
"""Key of {step, id} in Lightning's checkpoint dict: which save it belongs to."""
TMP, DELETING = ".tmp", ".deleting"
SUPERSEDED = "superseded"
"""Folder (inside checkpoints/) where units newer than a resumed one are moved: they belong to an abandoned run."""
MIN_KEEP = 2
"""Pruning always keeps the newest two units: if the newest one is damaged later, the one before it is intact."""
PHASES = ("model", "rank_state", "manifest", "commit", "prune")
"""The steps of a save, in order; `after_phase` is called after each."""

_UNIT_NAME = re.compile(r"step=(\d+)")
_RANK_STATE_NAME = re.compile(r"rank\d+\.safetensors")
_CHUNK = 1 << 24


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, damaged, incomplete, from another save, not ours); the message names
    the file and what to pass instead. A user's problem like a bad config value: the command-line tools print it as
    one line."""


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf; `step` is the global step whose state is non-finite (checkpoints from it on are
    useless: resume from an earlier one)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def after_phase(phase: str, path: Path) -> None:
    """Called after each phase of a save (`PHASES`; `path`: the unit's folder); does nothing. Tests replace it to
    stop a save there, as a kill would."""


@dataclass(frozen=True)
class Unit:
    """A committed checkpoint folder `step=N/` (one with a manifest)."""

    path: Path
    step: int

    @property
    def model(self) -> Path:
        return self.path / MODEL

    def rank_state(self, rank: int) -> Path:
        return self.path / rank_state_name(rank)


def unit_name(step: int) -> str:
    return f"step={step:09d}"


def rank_state_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def new_unit_id() -> str:
    return uuid.uuid4().hex


# ---- finding units -------------------------------------------------------------------------------------------------
def list_units(directory: str | Path) -> list[Unit]:
    """The committed units in `directory` (a run's checkpoints/), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    units = []
    for p in directory.iterdir():
        m = _UNIT_NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            units.append(Unit(p, int(m.group(1))))
    return sorted(units, key=lambda u: u.step)


def unit_containing(path: str | Path) -> Unit | None:
    """The unit `path` is (or is inside: its model.ckpt, a rank state, a shard), else None."""
    path = Path(path)
    for p in (path, path.parent, path.parent.parent):
        m = _UNIT_NAME.fullmatch(p.name)
        if m and (p / MANIFEST).is_file():
            return Unit(p, int(m.group(1)))
    return None


def find_unit(path: str | Path, what: str) -> Unit:
    """The unit that `path` names: a unit folder or a file in one, or the newest unit of a run's checkpoints/ folder
    or of a run folder. `what` says where the path came from (for the error)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what}: {path} does not exist")
    unit = unit_containing(path)
    if unit is not None:
        return unit
    if path.is_dir():
        for directory in (path, path / "checkpoints"):
            units = list_units(directory)
            if units:
                return units[-1]
    name = path.name
    if path.is_dir() and (_UNIT_NAME.fullmatch(name) or name.endswith(TMP)):
        raise CheckpointError(f"{what}: {path} is an incomplete checkpoint (no {MANIFEST}: its save was interrupted); "
                              f"use a complete one: {describe_units(path.parent)}")
    raise CheckpointError(f"{what}: {path} is not a checkpoint of mplus_lightning.fit (expected a folder "
                          f"checkpoints/step=N/ with {MANIFEST}, or a run's checkpoints/ folder)")


def describe_units(directory: Path) -> str:
    units = list_units(directory)
    return ", ".join(str(u.path) for u in units) if units else f"{directory} holds none"


def newest_before(directory: str | Path, step: int) -> Unit | None:
    """The newest committed unit of `directory` saved before `step`."""
    earlier = [u for u in list_units(directory) if u.step < step]
    return earlier[-1] if earlier else None


# ---- writing -------------------------------------------------------------------------------------------------------
def begin_unit(directory: str | Path, step: int) -> Path:
    """A fresh, empty `step=N.tmp/` folder to write a unit into (what an interrupted save left there is removed)."""
    tmp = Path(directory) / (unit_name(step) + TMP)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())   # the data is on the disk before the manifest that vouches for it
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _digest(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256(path, sync=True)}


def file_digests(folder: Path, rank: int | None = None) -> dict[str, dict]:
    """Size and sha256 (read back from the disk after an fsync) of a unit's files being written: all of them, or those
    `rank` vouches for (its own rank state; on rank 0 also every file that is not a rank state), so that the ranks of
    a large run split the reading of their memories between them."""
    files = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    if rank is None:
        return {rel: _digest(p) for rel, p in files.items()}
    out = {}
    own = folder / rank_state_name(rank)
    if own.is_file():
        out[own.name] = _digest(own)
    if rank == 0:
        out.update({rel: _digest(p) for rel, p in files.items() if not _RANK_STATE_NAME.fullmatch(rel)})
    return out


def commit_unit(tmp: Path, step: int, unit_id: str, ranks: int, digests: dict[str, dict] | None = None) -> Unit:
    """Write the manifest of a unit whose files are all in `tmp` (`digests`: `file_digests` of all of them, else
    computed here), then rename it to `step=N/`: the unit exists complete or not at all."""
    files = file_digests(tmp) if digests is None else digests
    if sorted(files) != [p.relative_to(tmp).as_posix() for p in _files(tmp)]:
        raise RuntimeError(f"{tmp}: the checksums do not cover exactly the files written")
    write_json_atomically(tmp / MANIFEST, {"format": FORMAT, "step": step, "id": unit_id, "ranks": ranks,
                                           "files": files})
    after_phase("manifest", tmp)
    final = tmp.with_name(unit_name(step))
    if final.exists():   # left by an abandoned run at this step: never mixed with the new one
        move_aside(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    after_phase("commit", final)
    return Unit(final, step)


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` units (at least `MIN_KEEP`; keep < 0: none removed). Call it after a commit."""
    units = list_units(directory)
    if keep < 0:
        return []
    removed = []
    for unit in units[: max(0, len(units) - max(keep, MIN_KEEP))]:
        doomed = unit.path.with_name(unit.path.name + DELETING)   # not a unit any more before a file goes
        os.replace(unit.path, doomed)
        after_phase("prune", doomed)
        shutil.rmtree(doomed)
        removed.append(unit.path)
    return removed


def remove_incomplete(directory: str | Path) -> list[Path]:
    """Remove what interrupted saves and prunes left (`step=N.tmp/`, `step=N.deleting/`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step=")
                 and (p.name.endswith(TMP) or p.name.endswith(DELETING))]
    for p in leftovers:
        shutil.rmtree(p)
    return leftovers


def move_aside(path: Path) -> Path:
    """Move a unit into checkpoints/superseded/<time>/ (kept, never read by resume=last)."""
    target = path.parent / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S") / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{path.name}.{time.time_ns()}")
    os.replace(path, target)
    return target


def supersede(directory: str | Path, resumed: Unit) -> list[Path]:
    """Move the units at or after a resumed unit's step (except it) aside: the resumed run writes those steps again,
    and `resume=last` must not go back to the abandoned ones."""
    later = [u for u in list_units(directory) if u.step >= resumed.step and u.path.resolve() != resumed.path.resolve()]
    return [move_aside(u.path) for u in later]


# ---- rank states: safetensors + JSON -------------------------------------------------------------------------------
def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON, each tensor replaced by {"__tensor__": its key in `tensors`} and tuples tagged as such."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"rank state: {key or 'the state'} has non-string keys")
        return {k: _split(v, f"{key}.{k}" if key else k, tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"rank state: {key} is a {type(obj).__name__}, which is not saved (tensors, numbers, strings, "
                    "lists, tuples and dicts are)")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def write_rank_state(path: str | Path, state: dict[str, Any]) -> None:
    """One rank's state (`MemoryStep.state_dict()` plus the torch RNG, world size and unit) as one safetensors file:
    the tensors, and everything else as JSON in its header."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, "", tensors)
    save_file(tensors, str(path), metadata={"format": RANK_STATE_FORMAT, "state": json.dumps(tree)})


def _rank_state_header(path: Path) -> tuple[dict, list[str]]:
    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except Exception as e:  # safetensors raises its own error types for every kind of bad header
        raise CheckpointError(f"{path} is not a readable rank state ({_first_line(e)}): truncated or not written by "
                              "mplus_lightning.fit") from None
    if meta.get("format") != RANK_STATE_FORMAT or "state" not in meta:
        raise CheckpointError(f"{path} is not a rank state of mplus_lightning.fit (its header says format "
                              f"{meta.get('format')!r}, expected {RANK_STATE_FORMAT!r})")
    try:
        return json.loads(meta["state"]), keys
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the JSON in its header is malformed ({e})") from None


def read_rank_state_unit(path: str | Path) -> dict | None:
    """The {step, id} a rank state file was saved with (reads the header only)."""
    tree, _ = _rank_state_header(Path(path))
    return tree.get("unit")


def read_rank_state(path: str | Path) -> dict[str, Any]:
    """A state written by `write_rank_state`, tensors on CPU; errors name the file."""
    path = Path(path)
    tree, keys = _rank_state_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # any failure to read the body is a damaged file
        raise CheckpointError(f"{path}: its tensors cannot be read ({_first_line(e)}): the file is damaged") from None
    try:
        return _join(tree, tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: its header names tensor {e} that the file does not hold (of {len(keys)})") \
            from None


# ---- Lightning's checkpoint, read without running code -------------------------------------------------------------
_SHARDED_INDEX_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}
"""What the pickled index (`.metadata`) of a torch.distributed.checkpoint folder may construct (plus torch dtypes)."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SHARDED_INDEX_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def check_sharded_checkpoint(path: Path) -> None:
    """Refuse a sharded (torch.distributed.checkpoint) folder whose loading would run code: its pickled index may only
    build the index's own types, and each non-tensor entry must load with `torch.load(weights_only=True)`
    (torch's reader unpickles both without restriction)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index_file = path / ".metadata"
    try:
        with open(index_file, "rb") as f:
            index = _IndexUnpickler(f).load()
        storage, entries = index.storage_data, index.state_dict_metadata
    except Exception as e:  # any failure here means the index is not one we can trust
        raise CheckpointError(f"{index_file} is not a safe checkpoint index ({_first_line(e)})") from None
    for key, info in storage.items():
        if not isinstance(entries.get(key.fqn), BytesStorageMetadata):
            continue
        shard = (path / info.relative_path).resolve()
        if path.resolve() not in shard.parents or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{index_file}: entry {key.fqn} points outside the checkpoint or is transformed")
        with open(shard, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as e:  # a refused unpickling or a bad blob: either way not plain data
            raise CheckpointError(f"{shard}: entry {key.fqn} is not plain data ({_first_line(e)})") from None


def read_lightning_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Lightning's checkpoint dict, read without running code; a sharded folder gives its non-tensor part (meta.pt).
    `mmap`: tensors stay on the disk until used (a cheap check of a large file). Errors name the file."""
    path = Path(path)
    target = path / "meta.pt" if path.is_dir() else path
    try:
        if path.is_dir():
            check_sharded_checkpoint(path)
        return torch.load(target, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as e:  # torch.load raises many types for a bad file; all mean the same here
        raise CheckpointError(f"{target} is not a readable Lightning checkpoint ({_first_line(e)}): truncated, damaged "
                              "or not written by mplus_lightning.fit") from None


def read_full_checkpoint(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint on this process: a sharded folder is consolidated (`check_sharded_checkpoint` first)."""
    path = Path(path)
    if not path.is_dir():
        return read_lightning_checkpoint(path)
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = read_lightning_checkpoint(path)   # checks the index too
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/full.pt")
        state = read_lightning_checkpoint(f"{tmp}/full.pt")
    return {**meta, **state}


# ---- frozen backbones: named and fingerprinted, not stored ---------------------------------------------------------
FROZEN_BACKBONE = "mplus_frozen_backbone"
"""Key in Lightning's checkpoint dict of a run whose backbone is frozen: where the backbone came from, the sha256 of
each of its tensors and the run config that rebuilds it. Its tensors are not in the checkpoint's state_dict."""
FROZEN_BACKBONE_FORMAT = "mplus_lightning.frozen_backbone/1"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the same values in another dtype are another tensor)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype} {list(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def backbone_source(cfg: Any) -> tuple[str, str]:
    """(config key, description) of where a run's weights come from: init_from, model.path, or (init=tiny) the seed."""
    if cfg.init_from:
        return "init_from", str(Path(cfg.init_from).resolve())
    if cfg.model.init in ("llama", "pretrained") and cfg.model.path:
        return "model.path", str(Path(cfg.model.path).resolve())
    return "", f"model.init=tiny with model.llama and trainer.seed={cfg.trainer.seed}"


@dataclass(frozen=True)
class FrozenBackbone:
    """The frozen backbone of a run (model.train_backbone false): its weights never change, so the run's checkpoints
    name it and fingerprint it instead of storing it again at every save, and a resume or an export rebuilds it from
    the run's own init source and checks the fingerprint before using it.

    The fingerprint is the sha256 of each frozen tensor as built (before Lightning moves or casts the model): it
    covers every init source, random tiny ones included, costs one read of the weights per start (tensors hashed in
    parallel threads), and names the tensor that changed."""

    model: torch.nn.Module
    """The MPlus whose frozen parameters these are (read again when a checkpoint is loaded)."""
    prefix: str
    """Their keys in Lightning's state dict are prefix + the model's state-dict key."""
    digests: dict[str, str]
    """State-dict key -> tensor_sha256 of the tensor as built."""
    source_key: str
    """The config key that says where the backbone comes from ("" for a random tiny init)."""
    source: str
    config: dict
    """The run config (JSON types, paths absolute), from which an export rebuilds the backbone."""

    @classmethod
    def of(cls, cfg: Any, model: torch.nn.Module, prefix: str = "model.") -> FrozenBackbone:
        params = dict(model.named_parameters(remove_duplicate=False))
        frozen = [n for n, p in params.items() if not p.requires_grad]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:   # hashlib releases the GIL
            digests = dict(zip((prefix + n for n in frozen), pool.map(tensor_sha256, (params[n] for n in frozen))))
        key, source = backbone_source(cfg)
        config = json.loads(json.dumps(asdict(cfg), default=str))   # plain types: weights_only loads it
        config.update(resume=None, overwrite=False)
        if cfg.init_from:
            config["init_from"] = source
        elif key:
            config["model"]["path"] = source
        return cls(model, prefix, digests, key, source, config)

    def record(self) -> dict[str, Any]:
        return {"format": FROZEN_BACKBONE_FORMAT, "source_key": self.source_key, "source": self.source,
                "digests": dict(self.digests), "config": self.config}

    def strip(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Lightning's checkpoint dict without the frozen tensors, naming them instead."""
        state = checkpoint["state_dict"]
        missing = sorted(self.digests.keys() - state.keys())
        if missing:
            raise RuntimeError(f"the frozen backbone tensor {missing[0]} is not in the state dict being saved")
        return {**checkpoint, "state_dict": {k: v for k, v in state.items() if k not in self.digests},
                FROZEN_BACKBONE: self.record()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The frozen tensors now, by state-dict key (keep_vars: no copies)."""
        state = self.model.state_dict(keep_vars=True)
        return {key: state[key[len(self.prefix):]] for key in self.digests}

    def fix(self) -> str:
        if self.source_key:
            return (f"set {self.source_key}= to the weights the run started from (a moved copy is fine), or start a "
                    "new run (overwrite=true or another name=)")
        return "use the model.llama and trainer.seed the run started with, or start a new run (overwrite=true)"


def frozen_backbone(cfg: Any, model: torch.nn.Module, prefix: str = "model.") -> FrozenBackbone | None:
    """The run's frozen backbone to leave out of its checkpoints, or None where they store every weight: runs that
    train the backbone (the demo, stage pretrain, whose frozen parts are the memory's) and FSDP2's sharded
    checkpoints, which torch.distributed.checkpoint writes and reads whole (each rank only its shard)."""
    if cfg.model.train_backbone or cfg.stage == "pretrain" or cfg.trainer.strategy == "fsdp2":
        return None
    return FrozenBackbone.of(cfg, model, prefix)


def saved_backbone(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """What Lightning's checkpoint dict (read from `path`) records of its frozen backbone (`FrozenBackbone.record`),
    or None where it stores every weight."""
    record = checkpoint.get(FROZEN_BACKBONE)
    if record is not None and not (isinstance(record, dict) and record.get("format") == FROZEN_BACKBONE_FORMAT
                                   and isinstance(record.get("digests"), dict)):
        raise CheckpointError(f"{path}: its {FROZEN_BACKBONE} entry is not one of mplus_lightning.fit (format "
                              f"{FROZEN_BACKBONE_FORMAT})")
    return record


def restore_frozen_backbone(checkpoint: dict[str, Any], frozen: FrozenBackbone | None, path: str | Path,
                            fix: str | None = None) -> dict[str, Any]:
    """Lightning's checkpoint dict (read from `path`) with the frozen backbone it names put back from `frozen` (the
    backbone rebuilt from the run's init source), after checking that it has the saved fingerprint; a checkpoint that
    stores every weight is returned as it is. `fix`: what to do on a mismatch (default: `frozen.fix()`)."""
    record = saved_backbone(checkpoint, path)
    if record is None:
        return checkpoint
    if frozen is None:
        raise CheckpointError(f"{path} holds no copy of its frozen backbone (from {record.get('source')}), and this "
                              "run would not rebuild it: resume with the run's model.train_backbone=false and a "
                              "trainer.strategy other than fsdp2")
    saved, built = record["digests"], frozen.digests
    differ = sorted(k for k in saved.keys() | built.keys() if saved.get(k) != built.get(k))
    if differ:
        key = differ[0]
        how = ("is not frozen in this run" if key not in built else "is not part of the saved backbone"
               if key not in saved else "has other values")
        raise CheckpointError(f"{path}: the frozen backbone rebuilt from {frozen.source} differs from the one the run "
                              f"started from ({record.get('source')}): tensor {key} {how} ({len(differ)} of "
                              f"{len(saved)} tensors differ); {fix or frozen.fix()}")
    return {**checkpoint, "state_dict": {**checkpoint["state_dict"], **frozen.tensors()}}


# ---- verifying -----------------------------------------------------------------------------------------------------
def read_manifest(unit: Unit) -> dict[str, Any]:
    path = unit.path / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        ok = (manifest.get("format") == FORMAT and isinstance(manifest.get("files"), dict)
              and isinstance(manifest.get("step"), int) and isinstance(manifest.get("ranks"), int))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path} is unreadable ({_first_line(e)}): the checkpoint is damaged") from None
    if not ok:
        raise CheckpointError(f"{path} is not a manifest of mplus_lightning.fit (format {FORMAT})")
    if manifest["step"] != unit.step:
        raise CheckpointError(f"{path} says step {manifest['step']} but its folder is {unit.path.name}: the checkpoint "
                              "is damaged or was renamed")
    return manifest


def check_same_save(expected: Any, got: Any, expected_from: Path, got_from: Path) -> None:
    """Refuse two files of a unit whose {step, id} differ (they were written by different saves)."""
    def step(x: Any) -> Any:
        return x.get("step") if isinstance(x, dict) else None

    if not (isinstance(expected, dict) and isinstance(got, dict) and expected.get("id") is not None
            and (got.get("step"), got.get("id")) == (expected.get("step"), expected.get("id"))):
        raise CheckpointError(f"{got_from} (step {step(got)}) and {expected_from} (step {step(expected)}) were written "
                              "by different saves: the checkpoint mixes files of two saves")


def verify_unit(unit: Unit, rank: int | None = None) -> dict[str, Any]:
    """Check a unit before reading it: the manifest, every file's presence and size, the sha256 of Lightning's
    checkpoint and of the rank state(s) read (`rank`: the one a process with that rank reads; None: all), that they
    can be read without running code and that they come from the same save. Returns the manifest."""
    manifest = read_manifest(unit)
    files = manifest["files"]
    for rel, info in files.items():
        p = unit.path / rel
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {unit.path / MANIFEST})")
        size = p.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(f"{p} has {size} bytes, its manifest says {info.get('size')}: truncated or damaged")
    ranks = manifest["ranks"]
    readers = list(range(ranks)) if rank is None else ([rank % ranks] if ranks else [])
    states = {rank_state_name(r) for r in readers}
    for name in states:
        if name not in files:
            raise CheckpointError(f"{unit.path / name} is missing from {unit.path / MANIFEST}")
    model_files = [rel for rel in files if rel == MODEL or rel.startswith(MODEL + "/")]
    if not model_files:
        raise CheckpointError(f"{unit.model} is missing from {unit.path / MANIFEST}")
    for rel in model_files + sorted(states):
        if sha256(unit.path / rel) != files[rel].get("sha256"):
            raise CheckpointError(f"{unit.path / rel} does not match its checksum in {MANIFEST}: the file is damaged")
    expected = {"step": manifest["step"], "id": manifest.get("id")}
    checkpoint = read_lightning_checkpoint(unit.model, mmap=True)
    check_same_save(expected, checkpoint.get(UNIT_KEY), unit.path / MANIFEST, unit.model)
    if checkpoint.get("global_step") != manifest["step"]:
        raise CheckpointError(f"{unit.model} is at step {checkpoint.get('global_step')} but {unit.path / MANIFEST} "
                              f"says {manifest['step']}: the checkpoint mixes files of two saves")
    for name in sorted(states):
        check_same_save(expected, read_rank_state_unit(unit.path / name), unit.path / MANIFEST, unit.path / name)
    return manifest


def intact_before(unit: Unit, rank: int | None = None) -> list[Unit]:
    """The units of `unit`'s folder saved before it that verify (newest first)."""
    intact = []
    for other in reversed(list_units(unit.path.parent)):
        if other.step < unit.step:
            try:
                verify_unit(other, rank)
            except CheckpointError:
                continue
            intact.append(other)
    return intact


def verify_or_refuse(unit: Unit, rank: int | None = None, *, use: str = "resume=") -> dict[str, Any]:
    """`verify_unit`, with the intact earlier units (to pass as `use`<path>) added to a refusal."""
    try:
        return verify_unit(unit, rank)
    except CheckpointError as e:
        alternatives = intact_before(unit, rank)
        if alternatives:
            hint = "intact earlier checkpoints: " + ", ".join(f"{use}{u.path}" for u in alternatives)
        else:
            hint = f"no intact earlier checkpoint in {unit.path.parent}"
        raise CheckpointError(f"{e}; refusing {unit.path}. {hint[0].upper()}{hint[1:]}") from None


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN/inf (sharded tensors: this rank's part), else None."""
    for name, t in named:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
