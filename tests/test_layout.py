"""The package's layout: imports point one way, in the method's order (issue #12).

A module may import only modules listed before it in `ORDER`; the loop (`training`) knows neither
clustering nor representatives, and the wrapper never needs the CLI's `data` subpackage.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "encodenet_timm"

# lowest first: each module is imported only by modules after it
ORDER = [
    "models",                                    # the CIFAR zoo, registered into timm
    "errors",                                    # error types
    "config_io",                                 # what every config shares: YAML round trip, dotted keys, help text
    "config", "env", "seeding", "stats", "distributed",  # plain data, machine facts, seeds and RNG states, statistics, process-group glue
    "files",                                     # atomic files, safe reads, one writer per directory
    "stopping",                                  # SIGTERM/SIGINT handlers for the length of a run
    "device_data",                               # datasets held on the training device, batched there
    "file_checks",                               # image files scanned before training, named when a read fails
    "checks", "loaders",                         # the other input checks; every DataLoader the package builds
    "split", "shape_trail", "decoder",           # encoder/head split; the encoder's shape trail; the mirrored decoder
    "feature_store", "clustering", "representatives",  # the representatives step, in its order
    "tasks", "training",                         # stage modules and tasks; the one loop
    "checkpoint", "run_dir", "run", "export", "wrapper",  # stage checkpoints; run directories; one fit over one; timm folders; the stages in order
    "controls", "row_names", "report", "result",  # a resumable supervised row, its guard; rows by name; a comparison's report; its result
    "compute", "rows", "compare",                # the recipe's cost; each row's training; the comparison
    "compat", "plots", "data", "cli",            # check_model; pictures; the CLI's datasets; the command
]


def _module_of(path: Path) -> str:
    """Top-level module name inside the package: encodenet_timm/data/cifar.py -> "data"."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported(path: Path):
    """Top-level package modules that `path` imports (relative or absolute), with their line numbers."""
    inside_sub = len(path.relative_to(PACKAGE).parts) > 1
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("encodenet_timm"):
                    continue
                parts = node.module.split(".")[1:]
            else:
                if node.level == 1 and inside_sub:  # `from .x import` inside a subpackage: its own module
                    continue
                parts = (node.module or "").split(".") if node.module else []
            if parts and parts[0]:
                yield parts[0], node.lineno
            else:  # `from . import a, b`
                for alias in node.names:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("encodenet_timm."):
                    yield alias.name.split(".")[1], node.lineno


def test_every_module_is_placed():
    found = {_module_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert found == set(ORDER), f"unplaced: {sorted(found - set(ORDER))}, gone: {sorted(set(ORDER) - found)}"


def test_no_module_imports_one_above_it():
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _module_of(path)
        if own == "__init__":  # the package's public API re-exports from everywhere
            continue
        for name, line in _imported(path):
            if name == "__version__":  # env.versions() reads the package's version attribute
                continue
            if name != own and rank[name] >= rank[own]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert not upward, upward


def test_the_loop_knows_no_method_step():
    imported = {name for name, _ in _imported(PACKAGE / "training.py")}
    assert not imported & {"clustering", "representatives", "feature_store", "wrapper", "checkpoint", "run_dir", "run"}, imported
