"""The demo prints the same table for the same command, seed and commit: whatever the load, the hash seed, and the
thread and kernel settings of the environment it is started in (it pins those itself: demo.PINNED_ENV)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mplus_lightning import demo

ROOT = Path(__file__).parents[1]
RUN_TIMEOUT_S = 300
HAS_AVX2 = bool(torch.cpu.get_capabilities().get("avx2", False))


def test_the_pinned_environment_overrides_the_callers_settings():
    env = {"OMP_NUM_THREADS": "8", "MKL_CBWR": "COMPATIBLE", "HOME": "/somewhere"}
    pinned = demo.pinned_environment(env)
    assert pinned["OMP_NUM_THREADS"] == pinned["MKL_NUM_THREADS"] == "1" and pinned["HOME"] == "/somewhere"
    if HAS_AVX2:
        assert pinned["MKL_CBWR"] == "AVX2" and pinned["ATEN_CPU_CAPABILITY"] == "avx2"
    assert demo.pinned_environment(pinned) == pinned


def test_the_program_restarts_once_in_the_pinned_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    for key in demo.PINNED_ENV:
        monkeypatch.delenv(key, raising=False)
    demo.restart_pinned(["--quick", "--seed", "3"])
    assert len(calls) == 1
    exe, args, env = calls[0]
    assert exe == sys.executable and args[1:] == ["-m", "mplus_lightning.demo", "--quick", "--seed", "3"]
    assert env == demo.pinned_environment(os.environ) and env["OMP_NUM_THREADS"] == "1"
    for key, value in env.items():     # started in that environment: no second restart
        monkeypatch.setenv(key, value)
    demo.restart_pinned(["--quick"])
    assert len(calls) == 1


def start_demo(cwd: Path, env_changes: dict[str, str]) -> subprocess.Popen:
    """`python -m mplus_lightning.demo --quick` in `cwd` (relative --out/--data: the results name the same paths),
    started without the demo's pins plus `env_changes`."""
    env = {k: v for k, v in os.environ.items() if k not in demo.PINNED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(env_changes)
    cwd.mkdir()
    return subprocess.Popen([sys.executable, "-m", "mplus_lightning.demo", "--quick", "--out", "out", "--data", "data"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outputs(run: Path) -> dict[str, str]:
    """sha256 of what the table is made of: the evaluation's results and answers, and every stage's exported
    weights and memory (bitwise: the quick demo's accuracies are all near 0, its weights are not)."""
    files = [run / "out" / "retention" / "results.json", run / "out" / "retention" / "items.jsonl",
             *sorted((run / "out" / "runs").glob("*/export/**/*.safetensors"))]
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.slow
def test_two_processes_print_the_same_table(tmp_path):
    # Run side by side (each loads the other's core); the second with another hash seed, more threads and, on AVX2
    # CPUs, the kernels another CPU would pick (torch's generic ones, MKL's SSE2 branch): measured without the pins,
    # each of these changed the weights.
    other = {"PYTHONHASHSEED": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    if HAS_AVX2:
        other.update({"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"})
    runs = {"a": start_demo(tmp_path / "a", {"PYTHONHASHSEED": "1"}), "b": start_demo(tmp_path / "b", other)}
    logs = {name: proc.communicate(timeout=RUN_TIMEOUT_S)[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, logs[name][-3000:]
        assert "pinned for a reproducible table: OMP_NUM_THREADS=1, MKL_NUM_THREADS=1" in logs[name]
        assert "NOT in the pinned environment" not in logs[name]
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert len(a) == 2 + 3 * 2    # results, answers, each memory stage's model and memory
    assert a == b, [f for f in a if a[f] != b.get(f)]
    results = tmp_path / "a" / "out" / "retention" / "results.json"
    assert results.read_bytes() == (tmp_path / "b" / "out" / "retention" / "results.json").read_bytes()
    summary = json.loads((tmp_path / "b" / "out" / "demo_summary.json").read_text())
    assert summary["environment"]["OMP_NUM_THREADS"] == "1"
    assert summary["environment"]["MKL_CBWR"] == ("AVX2" if HAS_AVX2 else None)
    table = [line for line in logs["a"].splitlines() if line.strip().startswith(("0 ", "12 ", "48 "))]
    assert len(table) == 3 and all(line in logs["b"] for line in table)
