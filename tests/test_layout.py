"""The shape of the code: imports point one way, each file owns one job, and the few things that must live in
one place (console output, fault hooks, the checkpoint name, speed figures) live there. Read from the
sources, so a change that breaks the layout fails here by name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

ENGINE = sorted((ROOT / "engine").glob("*.py"))
LIBRARIES = sorted([*(ROOT / "data").glob("*.py"), *(ROOT / "resnet").glob("*.py")])
SOURCES = [ROOT / "train_imagenet.py", *ENGINE, *LIBRARIES]


def imported(path: Path) -> set[str]:
    """Top-level names of what a file imports, with `engine.x` for the engine's own modules."""
    package = path.parent.name
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = f"{package}.{node.module or ''}".rstrip(".") if node.level else node.module
            names |= {base} | ({f"{base}.{a.name}" for a in node.names} if base == package else set())
    return names


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", LIBRARIES, ids=rel)
def test_resnet_and_data_never_import_the_engine_or_the_entry_point(path):
    bad = {n for n in imported(path) if n.split(".")[0] in ("engine", "train_imagenet")}
    assert not bad, f"{rel(path)} imports {bad}"
    if path.parent.name == "resnet":
        assert not {n for n in imported(path) if n.split(".")[0] in ("data", "timm", "torchvision")}
    if path.parent.name == "data":
        assert not {n for n in imported(path) if n.split(".")[0] == "resnet"}, "data/ never imports a model"


def test_engine_modules_import_each_other_without_cycles():
    graph = {p.stem: {n.split(".")[1] for n in imported(p) if n.startswith("engine.")} - {p.stem} for p in ENGINE}
    assert all(not any(n.startswith("train_imagenet") for n in imported(p)) for p in ENGINE)
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module not in done:
            visiting.append(module)
            for dep in graph.get(module, ()):
                visit(dep)
            visiting.pop()
            done.add(module)

    for module in graph:
        visit(module)


def long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{rel(path)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_the_entry_point_is_short_and_each_engine_file_and_function_small():
    assert len((ROOT / "train_imagenet.py").read_text().splitlines()) <= 150
    for path in ENGINE:
        assert len(path.read_text().splitlines()) <= 300, rel(path)
    assert not [f for p in [ROOT / "train_imagenet.py", *ENGINE] for f in long_functions(p, 50)]


def mentions(pattern: str, paths) -> list[str]:
    return sorted(rel(p) for p in paths if re.search(pattern, p.read_text()))


def test_console_lines_leave_through_the_console_module_only():
    # print, accelerator.print, tqdm.write, sys.exit(message): each would be a second way out
    assert mentions(r"\bprint\(|\.print\(|tqdm\.write|sys\.exit\(|sys\.std(out|err)\.write", ENGINE) == [
        "engine/console.py"]
    entry = (ROOT / "train_imagenet.py").read_text()
    assert not re.search(r"\bprint\(|\.print\(|tqdm\.write|sys\.std(out|err)", entry)


def test_fault_hooks_are_read_in_one_place():
    assert mentions(r"RESNET_FAULT_", SOURCES) == ["engine/faults.py"]


def test_the_checkpoint_directory_name_is_made_in_one_place():
    assert mentions(r"step-\{", SOURCES) == ["engine/checkpoints.py"]


def test_speed_figures_live_in_docs_benchmarks_not_in_the_code():
    figure = r"\d(\.\d+)? ?(ms|us|µs)\b|\d ?([x×]|%) (faster|slower|cheaper)"
    assert mentions(figure, SOURCES) == [], "put the figure in docs/benchmarks.md and point there"


def test_the_network_is_taken_out_of_its_wrappers_in_one_place():
    # accelerate's unwrap_model re-points a compiled module by default (engine/runtime.py, bare)
    assert mentions(r"unwrap_model\(", SOURCES) == ["engine/runtime.py"]
