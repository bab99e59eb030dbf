"""The package's layers (docs/deployment.md, "Layout"): every import goes to its own layer or one below, and no
module outside ``families/`` and ``tasks/`` branches on a family's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "esta"

#: rank, then the modules of that layer (a package name covers its modules)
LAYERS: dict[str, tuple[int, set[str]]] = {
    "foundations": (0, {"__init__", "_register", "errors", "files", "provenance", "budget", "hf_config", "data",
                        "families", "instruct", "llm_sources", "distillation", "flags", "sources"}),
    "method": (1, {"space", "routes", "stitching", "stitch_fit", "pst", "importance", "methods", "palette", "cost", "calibration", "probe",
                   "screening", "train", "checkpoint", "selection", "generate"}),
    "evaluation": (1, {"evaluate", "results", "pairs", "lm_eval", "analysis"}),
    "deployment": (2, {"deploy", "hf_native", "export", "serving", "serve", "profile"}),
    "reports": (2, {"report", "html_report"}),
    "jobs": (3, {"config", "recipe", "tasks", "runs", "bench", "pretrain"}),
    "interface": (4, {"cli", "__main__", "adapt", "lm_adapt"}),
}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _layer(module: str) -> str:
    top = module.split(".")[0]
    found = [name for name, (_, members) in LAYERS.items() if top in members]
    assert len(found) == 1, f"{module} is in {found or 'no layer'}: place it in LAYERS"
    return found[0]


def _imports(path: Path) -> set[str]:
    """The esta modules ``path`` imports (relative imports, anywhere in the file: late imports count too)."""
    package = path.relative_to(SRC).parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package)[: len(package) - (node.level - 1)]
            if node.module:
                out.add(".".join([*base, node.module]))
            else:
                out.update(".".join([*base, a.name]) for a in node.names)
    return {m for m in out if m}


def test_every_import_goes_to_its_own_layer_or_below():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module(path)
        rank = LAYERS[_layer(module)][0]
        for target in _imports(path):
            if LAYERS[_layer(target)][0] > rank:
                wrong.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_circle():
    graph = {_module(p): _imports(p) for p in SRC.rglob("*.py")}
    done: set[str] = set()
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            circles.append(path[path.index(m):] + [m])
            return
        if m in done or m not in graph:
            return
        for t in sorted(graph[m]):
            visit(t, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert not circles, circles


def test_no_module_outside_families_and_tasks_compares_a_family_name():
    pattern = re.compile(r"""family\s*(==|!=|\bnot in\b|\bin\b)|["'](vision|causal-lm)["']""")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] in ("families", "tasks"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
