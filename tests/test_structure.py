"""The package's import graph: layers only import downwards, and no modules import each other in a circle.

Layers, lowest first (a module may import its own group and lower layers only; every import counts, including those
inside functions and under `if TYPE_CHECKING:`):
  base       generic helpers that import nothing of the package (the typed-config loader and its ConfigError); the
             model may not use them either (model/ imports nothing of the package outside model/)
  model      mplus_lightning.model.* (and the package root, which only re-exports it): plain torch, nothing above
  data       mplus_lightning.data.*: training data and the input-file helpers
  support    the other top-level modules that are not entry points: the run configuration, strategies
  eval | stages   evaluation, and training; neither imports the other
  entry      the command-line entry points: fit, evaluate, export, demo, bench*
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mplus_lightning"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
ENTRY_POINTS = {"fit", "evaluate", "export", "demo", "gpu_check"}
BASE = {"typed_config"}
"""Top-level modules below the data layer: they import nothing of the package."""
"""Top-level modules that are command lines (besides bench*); the rest of the top level is `support`."""
LAYERS = [("base",), ("model",), ("data",), ("support",), ("eval", "stages"), ("entry",)]
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "model"                         # the root package re-exports the model
    top = parts[1]
    if top in ("model", "data", "eval", "stages"):
        return top
    if top in BASE:
        return "base"
    if top in ENTRY_POINTS or top.startswith("bench"):
        return "entry"
    return "support"


def imports(module: str, path: Path, known: set[str], missing: list[str] | None = None) -> set[str]:
    """The package modules `module` imports (an imported name that is a submodule counts as that submodule);
    imports of package modules that do not exist are appended to `missing`."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
            if source.startswith(PACKAGE) and source not in known and missing is not None:
                missing.append(f"{module} imports {source}")
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]   # `import a.b.c` of a non-module attribute: its module
            if target in known and target != module:
                out.add(target)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports, for every module under `root`."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {m: imports(m, p, set(paths)) for m, p in paths.items()}


def missing_modules(root: Path = ROOT) -> list[str]:
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    missing: list[str] = []
    for m, p in paths.items():
        imports(m, p, set(paths), missing)
    return missing


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in g.items():
        for target in targets:
            a, b = group(module), group(target)
            if RANK[b] > RANK[a] or (RANK[b] == RANK[a] and a != b):
                out.append(f"{module} ({a}) imports {target} ({b})")
    return sorted(out)


def imports_out_of_model(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in g.items() if m.startswith(f"{PACKAGE}.model")
                  for t in ts if not t.startswith(f"{PACKAGE}.model"))


def cycles(g: dict[str, set[str]]) -> list[str]:
    """One path per back edge of a depth-first search: empty iff the graph has no cycle."""
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == "open":
                found.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    return found


def test_the_graph_sees_the_imports_it_should():
    g = graph()
    assert f"{PACKAGE}.model.memory" in g[f"{PACKAGE}.model.mplus"]
    assert f"{PACKAGE}.model.formats" in g[f"{PACKAGE}.model.mplus"]          # `from . import formats`
    assert f"{PACKAGE}.data.files" in g[f"{PACKAGE}.data.eval_sets.retention"]        # two dots up, then down
    assert f"{PACKAGE}.typed_config" in g[f"{PACKAGE}.data.eval_sets.datamodules"]    # three dots up
    assert g[PACKAGE] == {f"{PACKAGE}.model"}
    assert {group(m) for m in g} == {"base", "model", "data", "support", "eval", "stages", "entry"}


def test_every_import_of_the_package_names_an_existing_module():
    missing = missing_modules()
    assert not missing, "imports of modules that do not exist (moved or renamed?):\n" + "\n".join(missing)


def test_layers_import_only_downwards():
    upward = upward_imports(graph())
    layers = "base < model < data < support < eval|stages < entry"
    assert not upward, f"imports against the layers ({layers}):\n" + "\n".join(
        upward)


def test_model_imports_nothing_of_the_package_outside_model():
    outside = imports_out_of_model(graph())
    assert not outside, "\n".join(outside)


def test_base_modules_import_nothing_of_the_package():
    g = graph()
    assert all(not g[f"{PACKAGE}.{m}"] for m in BASE), {m: g[f"{PACKAGE}.{m}"] for m in BASE}


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "modules that import each other in a circle:\n" + "\n".join(found)


def test_the_checks_catch_violations(tmp_path):
    """An upward import that closes a circle, in a made-up package of two modules, fails every check."""
    fake = tmp_path / PACKAGE
    for d in (fake, fake / "model", fake / "eval"):
        d.mkdir(exist_ok=True)
        (d / "__init__.py").write_text("")
    (fake / "model" / "a.py").write_text("from ..eval import b\n")
    (fake / "eval" / "b.py").write_text("def f():\n    from ..model.a import x\n    from ..model.gone import y\n")
    g = graph(fake)
    a, b = f"{PACKAGE}.model.a", f"{PACKAGE}.eval.b"
    assert g[a] == {b} and g[b] == {a, f"{PACKAGE}.model"}     # the missing module counts as its package
    assert upward_imports(g) == [f"{a} (model) imports {b} (eval)"]
    assert imports_out_of_model(g) == [f"{a} imports {b}"]
    assert cycles(g) == [f"{b} -> {a} -> {b}"]
    assert missing_modules(fake) == [f"{b} imports {PACKAGE}.model.gone"]
