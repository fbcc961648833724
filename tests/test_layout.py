"""The layout the README's Architecture section describes, checked on the source: no import circles between
g2d's modules (imports inside functions count too), the layers import downwards only, mlflow is imported by
g2d/tracking alone (and g2d/mlflow_model.py, which MLflow runs), and each DVC stage lists the g2d/pipeline
and g2d/tracking code its command imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"g2d.config", "g2d.errors", "g2d.progress"}  # every layer may import these; they import only each other
# README: data -> (model) -> pipeline -> CLI; tracking stands beside data and model, under pipeline
FORBIDDEN = {
    "g2d.data": ("g2d.model", "g2d.pipeline", "g2d.tracking", "g2d.cli", "g2d.inference", "g2d.serving"),
    "g2d.model": ("g2d.data", "g2d.pipeline", "g2d.tracking", "g2d.cli", "g2d.inference", "g2d.serving"),
    "g2d.tracking": ("g2d.data", "g2d.model", "g2d.pipeline", "g2d.cli", "g2d.inference", "g2d.serving"),
    "g2d.pipeline": ("g2d.cli",),
}
MLFLOW_ALLOWED = ("g2d.tracking", "g2d.mlflow_model")


def _modules() -> dict[str, Path]:
    """Dotted name -> file; a package is its __init__.py, under the package's own name."""
    out = {}
    for path in sorted((ROOT / "g2d").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _known(name: str) -> str:
    """The module or package an import of `name` runs last: `g2d.pipeline.study.report.X` -> the longest module
    prefix."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports(module: str) -> dict[str, int]:
    """The g2d modules `module` imports (at the top or inside functions, under TYPE_CHECKING too), with the line
    of the first import of each; `from g2d.pipeline import finetune` names the module (or package) finetune,
    `from g2d.pipeline.finetune import stage as x` the module stage. Other top-level packages: under "ext:"."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            target = _known(name) if _is_within(name, "g2d") else "ext:" + name.split(".")[0]
            if target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {m: {t for t in imports(m) if not t.startswith("ext:")} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected group of modules (Tarjan), as a path a -> b -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:  # the shortest way round from the group's first module, for the message
        start = min(group)
        paths = {start: [start]}
        frontier = [start]
        while frontier and start not in {w for v in frontier for w in graph[v]}:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        out.append(paths[last] + [start])
    return out


def test_the_checker_sees_imports_inside_functions_and_names_the_module_imported():
    assert "g2d.pipeline.study.report" in GRAPH["g2d.cli"]  # inside the `report` command
    assert "g2d.tracking" in GRAPH["g2d.cli"] and "g2d" in GRAPH["g2d.cli"]  # `from g2d import tracking, __version__`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it_back():
    circles = _cycles(GRAPH)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_layers_import_downwards_only():
    wrong = []
    for module, targets in GRAPH.items():
        if module in LEAVES:
            wrong += [f"{module} -> {t} (a leaf imports leaves only)" for t in targets - LEAVES]
            continue
        for layer, banned in FORBIDDEN.items():
            if _is_within(module, layer):
                wrong += [f"{module} -> {t}" for t in sorted(targets) if any(_is_within(t, b) for b in banned)]
    assert not wrong, "imports against the layering (README, Architecture):\n" + "\n".join(wrong)


def test_only_tracking_imports_mlflow():
    users = sorted(m for m in MODULES if "ext:mlflow" in imports(m))
    assert users and all(any(_is_within(m, a) for a in MLFLOW_ALLOWED) for m in users), users


def test_package_inits_stay_light():
    """The pipeline's and the model's package __init__ files hold a docstring saying what the package does,
    no imports: the light commands (report, promote) never pay for torch through a family they touch for one
    small module. g2d.tracking's __init__ is its API: it imports its own modules (stdlib only at import)."""
    inits = {m: p for m, p in MODULES.items() if p.name == "__init__.py"}
    importing = {m: sorted(imports(m)) for m in inits
                 if (_is_within(m, "g2d.pipeline") or _is_within(m, "g2d.model")) and imports(m)}
    assert not importing, importing
    docless = [m for m in inits if (_is_within(m, "g2d.pipeline") or m in ("g2d.model", "g2d.tracking"))
               and not ast.get_docstring(ast.parse(inits[m].read_text()))]
    assert not docless, f"packages without a docstring saying what they do: {docless}"
    assert all(_is_within(t, "g2d.tracking") for t in imports("g2d.tracking")), imports("g2d.tracking")


# ---------------------------------------------------------------- dvc.yaml follows the imports

# what each DVC stage's command runs: the CLI command's own imports of g2d/pipeline
COMMANDS = {
    "g2d data synth": ["g2d.pipeline.datasets.synth"],
    "g2d pretrain": ["g2d.pipeline.pretrain.ablations", "g2d.pipeline.pretrain.stage"],
    "g2d train": ["g2d.pipeline.finetune.stage"],
    "g2d zeroshot": ["g2d.pipeline.zeroshot.stage"],
    "g2d ground": ["g2d.pipeline.zeroshot.grounding"],
    "g2d report": ["g2d.pipeline.study.report"],
    "g2d models promote": ["g2d.pipeline.study.promotion"],
}


# Code a stage runs that never shapes its outputs: where the run is recorded (MLflow) and the checks before the
# first step. Listed, a fix to either would make DVC re-run every pre-training. Only `promote`, whose result is the
# registry's alias, lists tracking.
RECORDS_ONLY = ("g2d.tracking", "g2d.pipeline.preflight")


def _records_only(m: str) -> bool:
    return any(_is_within(m, r) for r in RECORDS_ONLY)


def _closure(starts: list[str], skip=lambda m: False) -> set[str]:
    seen, todo = set(), list(starts)
    while todo:
        m = todo.pop()
        if m not in seen and not skip(m):
            seen.add(m)
            todo += GRAPH[m]
    return seen


def _stages() -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (its commands, its deps)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        cmds = st["cmd"] if isinstance(st["cmd"], list) else [st["cmd"]]
        out[name] = ([c.strip() for c in cmds], [str(d) for d in st.get("deps", [])])
    return out


def test_every_code_dependency_of_a_stage_exists():
    missing = [(stage, d) for stage, (_, deps) in _stages().items() for d in deps
               if d.startswith("g2d") and not (ROOT / d).exists()]
    assert not missing, missing


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_a_stage_lists_the_pipeline_and_tracking_code_it_runs(stage):
    """... and nothing of RECORDS_ONLY but in `promote`: those never change an output."""
    cmds, deps = _stages()[stage]
    starts = [m for cmd in cmds for prefix, mods in COMMANDS.items() if cmd.startswith(prefix) for m in mods]
    assert starts, f"{stage}: which modules does {cmds} run? add its command to COMMANDS"
    skip = (lambda m: False) if stage == "promote" else _records_only
    needed = {m for m in _closure(starts, skip) if _is_within(m, "g2d.pipeline") or _is_within(m, "g2d.tracking")}
    needed -= {m for m in needed if MODULES[m].name == "__init__.py" and not imports(m)}  # docstring-only packages

    def listed(m: str) -> bool:
        rel = MODULES[m].relative_to(ROOT)
        return any(rel == Path(d) or Path(d) in rel.parents for d in deps)

    unlisted = sorted(MODULES[m].relative_to(ROOT).as_posix() for m in needed if not listed(m))
    assert not unlisted, f"dvc.yaml stage {stage} runs code it does not list in its deps: {unlisted}"
    if stage != "promote":
        extra = [d for d in deps if d in ("g2d/tracking", "g2d/pipeline/preflight.py")]
        assert not extra, f"dvc.yaml stage {stage} lists {extra}, which never change its outputs (RECORDS_ONLY)"
