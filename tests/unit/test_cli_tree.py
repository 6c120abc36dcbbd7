"""The command line and the benchmarks are trees, not webs: read from their imports (ast)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import infra

INFRA = Path(infra.__file__).parent


def imported(path: Path, package: str) -> set[str]:
    """Modules of `package` that `path` imports, at module level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from infra.cli import saga` imports the module infra.cli.saga
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith(package + ".")} & modules_of(package)


def modules_of(package: str) -> set[str]:
    folder = INFRA / package.removeprefix("infra.")
    return {f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__")}


def source(module: str) -> Path:
    return INFRA / (module.removeprefix("infra.").replace(".", "/") + ".py")


def test_the_cli_is_a_tree_main_over_groups_over_common() -> None:
    modules = modules_of("infra.cli")
    groups = modules - {"infra.cli.main", "infra.cli.common"}
    assert {"infra.cli.saga", "infra.cli.dlq", "infra.cli.bench", "infra.cli.broker"} <= groups
    assert imported(source("infra.cli.common"), "infra.cli") == set(), "common is the leaf"
    for group in sorted(groups):
        assert imported(source(group), "infra.cli") <= {"infra.cli.common"}, f"{group} imports another group or main"
    assert imported(source("infra.cli.main"), "infra.cli") == groups, "main registers every group"
    package = INFRA / "cli" / "__init__.py"
    assert not [n for n in ast.walk(ast.parse(package.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_every_group_has_its_own_typer_and_main_imports() -> None:
    import typer

    main = importlib.import_module("infra.cli.main")
    for group in sorted(modules_of("infra.cli") - {"infra.cli.main", "infra.cli.common"}):
        module = importlib.import_module(group)
        app = getattr(module, "app", None)
        assert app is None or (isinstance(app, typer.Typer) and app is not main.app), group


#: What benchmarks share: helpers, and the cost meter (counters, not a benchmark).
SHARED_BENCH_MODULES = {"infra.bench.common", "infra.bench.cost", "infra.bench.observers"}


def test_benchmarks_share_only_common() -> None:
    for module in sorted(modules_of("infra.bench") - SHARED_BENCH_MODULES):
        assert imported(source(module), "infra.bench") <= SHARED_BENCH_MODULES, f"{module} imports another benchmark"
    for shared in SHARED_BENCH_MODULES:
        assert imported(source(shared), "infra.bench") == set(), f"{shared} imports a benchmark"
