"""The layers of the house: a module imports only from its own layer or the layers below.

    0 data_prep   1 base (config, options, exit_codes, run_log, faults, testing)   2 rules (rules, run_tokenizer,
    flops, schedules, parallel/)   3 attention/   4 model/ + data/   5 checkpoint/   6 preflight   7 training/
    8 applications (cli, export, importer, inference, planner, studies)   9 benchmarks/

Rules, checked by parsing (never importing) every module, its imports at top level and inside functions:
- no import from a higher layer; among the applications export < importer < inference < studies, while planner
  and the train CLI neither import another application nor are imported by one;
- no import cycle, whatever the layer; no project import inside a function or class (no dodging a loop), except
  in a command's cli.py, which may import its project modules inside main() so that --help stays light, in a
  benchmark script (it sets threads and environment first), and for the modules in OPTIONAL (an optional
  dependency imported on first use);
- no re-export shim: a module whose body is only imports; no import of a module that does not exist;
- every module has a layer in LAYERS.
"""

from __future__ import annotations

import ast
from pathlib import Path

# Module prefix -> layer; the most specific prefix wins. The root package is an exact name, not a prefix.
LAYERS = {
    "data_prep": 0,
    "fpa_megatron": 1, "fpa_megatron.config": 1, "fpa_megatron.options": 1, "fpa_megatron.exit_codes": 1,
    "fpa_megatron.run_log": 1, "fpa_megatron.faults": 1, "fpa_megatron.testing": 1,
    "fpa_megatron.rules": 2, "fpa_megatron.run_tokenizer": 2, "fpa_megatron.flops": 2, "fpa_megatron.schedules": 2,
    "fpa_megatron.parallel": 2,
    "fpa_megatron.attention": 3,
    "fpa_megatron.model": 4, "fpa_megatron.data": 4,
    "fpa_megatron.checkpoint": 5,
    "fpa_megatron.preflight": 6,
    "fpa_megatron.training": 7,
    "fpa_megatron.cli": 8, "fpa_megatron.export": 8, "fpa_megatron.importer": 8, "fpa_megatron.inference": 8,
    "fpa_megatron.planner": 8, "fpa_megatron.studies": 8,
    "benchmarks": 9,
}
ROOT = "fpa_megatron"
LAYER_NAMES = ["data_prep", "base", "rules", "attention", "model+data", "checkpoint", "preflight", "training",
               "applications", "benchmarks"]
# Within the applications: a higher one may import a lower one; one not listed (planner, cli) is independent.
APP_ORDER = {"fpa_megatron.export": 1, "fpa_megatron.importer": 2, "fpa_megatron.inference": 3,
             "fpa_megatron.studies": 4}
PROJECT = ("fpa_megatron", "data_prep")
# Project modules that may be imported inside a function, and why.
OPTIONAL = {"fpa_megatron.attention.triton_kernels": "imports triton (optional; its interpreter mode is fixed at "
                                                     "its first import)"}


def prefix_of(module: str, table) -> str | None:
    """The most specific prefix of `module` in `table` (the root package only by its exact name)."""
    hits = [p for p in table if module == p or (p != ROOT and module.startswith(p + "."))]
    return max(hits, key=len, default=None)


def modules_of(root: Path) -> dict[str, Path]:
    """Module name -> file, for fpa_megatron/, data_prep/ and benchmarks/*.py under `root`."""
    files = [f for pkg in PROJECT for f in (root / pkg).rglob("*.py")] + sorted((root / "benchmarks").glob("*.py"))
    mods = {}
    for f in files:
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def imports_of(module: str, path: Path, root: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a def/class) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def exists(name):
        base = root.joinpath(*name.split("."))
        return base.with_suffix(".py").is_file() or base.is_dir()

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from . import x, from ..pkg import y
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" if exists(f"{base}.{a.name}") else base for a in child.names]
            else:
                visit(child, inner)
                continue
            found.extend((n, child.lineno, nested) for n in dict.fromkeys(names) if n.split(".")[0] in PROJECT)

    visit(tree, False)
    return found


def is_shim(path: Path) -> bool:
    """A body of only imports (a docstring and __all__ aside), at least one of them."""
    body = ast.parse(path.read_text()).body
    rest = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            and not (isinstance(s, ast.Assign) and [getattr(t, "id", "") for t in s.targets] == ["__all__"])]
    return bool(rest) and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in rest)


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    """Every module that `start` reaches through one or more imports."""
    seen, todo = set(), list(graph[start])
    while todo:
        if (node := todo.pop()) not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def shortest_loop(graph: dict[str, dict[str, int]], start: str) -> list[str]:
    """The modules of a shortest import path start -> ... -> start (breadth first)."""
    paths, todo = {start: [start]}, [start]
    for node in todo:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return paths[node]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                todo.append(nxt)
    return [start]


def named(module: str, layer: dict[str, int]) -> str:
    return f"{module} (layer {layer[module]} {LAYER_NAMES[layer[module]]})" if module in layer else module


def check_layers(root) -> list[str]:
    """Every breach of the layer rules in the tree under `root`, one line each."""
    root = Path(root)
    mods = modules_of(root)
    rel = {m: f.relative_to(root).as_posix() for m, f in mods.items()}
    place = {m: prefix_of(m, LAYERS) for m in mods}
    layer = {m: LAYERS[p] for m, p in place.items() if p}
    problems = [f"{rel[m]}: module {m} is in no layer: place it in a layer" for m in sorted(mods) if not place[m]]
    graph = {m: {} for m in mods}
    for m in sorted(mods):
        if is_shim(mods[m]):
            problems.append(f"{rel[m]}: re-export shim (its body is only imports): import from the real module")
        for target, line, nested in imports_of(m, mods[m], root):
            says = f"{rel[m]}:{line}: {named(m, layer)} imports {named(target, layer)}"
            if target not in mods:
                problems.append(f"{says}, which does not exist")
                continue
            if target != m:
                graph[m].setdefault(target, line)
            if nested and m.rpartition(".")[2] != "cli" and layer.get(m) != 9 and target not in OPTIONAL:
                problems.append(f"{says} inside a function or class: no import inside a function to dodge a loop")
            if m in layer and target in layer and layer[target] > layer[m]:
                problems.append(f"{says}: a higher layer")
            elif layer.get(m) == layer.get(target) == 8 and place[m] != place[target] and not (
                    place[m] in APP_ORDER and APP_ORDER.get(place[target], 99) < APP_ORDER[place[m]]):
                problems.append(f"{says}: against the order among applications (export < importer < inference < "
                                "studies; planner and cli stand alone)")
    reach = {m: reachable(graph, m) for m in graph}
    loops = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    for loop in sorted(loops, key=min):
        cycle = shortest_loop(graph, min(loop))
        hops = " -> ".join(f"{rel[a]}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:] + cycle[:1]))
        others = ", ".join(sorted(rel[n] for n in loop - set(cycle)))
        problems.append(f"import cycle: {hops} -> {rel[cycle[0]]}" + (f"; also in the loop: {others}" * bool(others)))
    return problems


def test_the_house_keeps_its_layers():
    problems = check_layers(Path(__file__).resolve().parents[1])
    assert not problems, f"{len(problems)} breaches of the layers:\n" + "\n".join(problems)


# The checker itself, on small synthetic trees: CLEAN keeps every rule; each test breaks one.
CLEAN = {
    "fpa_megatron/__init__.py": "", "data_prep/__init__.py": '"""Prep."""\n', "data_prep/quiet.py": "X = 1\n",
    "fpa_megatron/config.py": "from data_prep import quiet\nX = 1\n", "fpa_megatron/model/__init__.py": "",
    "fpa_megatron/model/gpt.py": "import fpa_megatron.config\nGPT = 1\n", "fpa_megatron/export/__init__.py": "",
    "fpa_megatron/export/hf.py": "from fpa_megatron.model import gpt\nx = 1\n",
    "fpa_megatron/inference/__init__.py": "", "fpa_megatron/inference/run.py": "from ..export.hf import x\ny = x\n",
    "fpa_megatron/cli.py": "def main():\n    from fpa_megatron.model.gpt import GPT\n    import json\n",
    "benchmarks/bench.py": "import fpa_megatron.inference.run\nprint(1)\n",
}


def problems_in(tmp_path, changes=None) -> list[str]:
    """check_layers on the tree CLEAN with `changes` (path -> text) written over it."""
    for rel, text in (CLEAN | (changes or {})).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return check_layers(tmp_path)


def test_a_clean_tree_has_no_breaches(tmp_path):
    assert problems_in(tmp_path) == []


def test_a_back_import_is_named_with_its_file_line_and_layers(tmp_path):
    problems = problems_in(tmp_path, {"fpa_megatron/config.py": "X = 1\n\nfrom fpa_megatron.model.gpt import GPT\n"})
    assert ("fpa_megatron/config.py:3: fpa_megatron.config (layer 1 base) imports fpa_megatron.model.gpt "
            "(layer 4 model+data): a higher layer") in problems


def test_a_loop_of_two_modules_is_named(tmp_path):
    problems = problems_in(tmp_path, {"fpa_megatron/model/a.py": "from fpa_megatron.model import b\n",
                                      "fpa_megatron/model/b.py": "def f():\n    import fpa_megatron.model.a\n"})
    assert [p for p in problems if "cycle" in p] == [  # a function-level import closes a loop too
        "import cycle: fpa_megatron/model/a.py:1 -> fpa_megatron/model/b.py:2 -> fpa_megatron/model/a.py"]


def test_an_import_inside_a_function_is_named_outside_a_cli(tmp_path):
    problems = problems_in(tmp_path, {"fpa_megatron/model/gpt.py": "def gpt():\n    from fpa_megatron import config\n"})
    assert problems == ["fpa_megatron/model/gpt.py:2: fpa_megatron.model.gpt (layer 4 model+data) imports "
                        "fpa_megatron.config (layer 1 base) inside a function or class: "
                        "no import inside a function to dodge a loop"]


def test_a_shim_an_unplaced_module_and_an_application_against_the_order_are_named(tmp_path):
    problems = problems_in(tmp_path, {"fpa_megatron/model/__init__.py": '"""Old path."""\nfrom .gpt import *\n',
                                      "fpa_megatron/export/hf.py": "from .. import cli\nx = 1\n",
                                      "fpa_megatron/quiet.py": ""})
    assert sorted(p.split(":")[0] for p in problems) == [
        "fpa_megatron/export/hf.py", "fpa_megatron/model/__init__.py", "fpa_megatron/quiet.py"], problems
    assert "against the order among applications" in "".join(problems) and "re-export shim" in "".join(problems)
