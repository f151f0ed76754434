"""The package's import graph is a DAG: no cycles, and the lower layers never import the entries.

Read with ``ast`` from the sources: imports inside functions and under ``if TYPE_CHECKING:``
count, so a cycle hidden behind a lazy import fails here too. The one exception is the package's
``__init__``, a facade whose ``TYPE_CHECKING`` imports only serve type checkers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import t2v_lightning

PACKAGE = Path(t2v_lightning.__file__).parent

# The entry points: nothing below them may import them.
ENTRIES = {
    "t2v_lightning.cli",
    "t2v_lightning.demo",
    "t2v_lightning.probe_classifier",
    "t2v_lightning.task2vec",
}
# Modules that only the entries (and each other) build on: the Fisher methods, the preparation,
# the labels, the Trainers, the artifact and the probe.
CORE = (
    "t2v_lightning.fisher",
    "t2v_lightning.prepare",
    "t2v_lightning.labels",
    "t2v_lightning.trainers",
    "t2v_lightning.embedding",
    "t2v_lightning.probe",
    "t2v_lightning.features",
    "t2v_lightning.head",
    "t2v_lightning.data",
    "t2v_lightning.similarity",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str], type_checking: bool = True) -> set[str]:
    """The package's modules that ``path`` imports (``type_checking``: also those under
    ``if TYPE_CHECKING:``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {
        name: imports_of(path, modules, type_checking=name != "t2v_lightning") - {name}
        for name, path in paths.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read_from_the_sources() -> None:
    graph = import_graph()
    assert "t2v_lightning.fisher.montecarlo" in graph["t2v_lightning.task2vec"]
    assert "t2v_lightning.prepare" in graph["t2v_lightning.fisher.variational"]


def test_find_cycle_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_core_never_imports_an_entry_point() -> None:
    upward = {
        (name, target)
        for name, targets in import_graph().items()
        if any(name == core or name.startswith(core + ".") for core in CORE)
        for target in targets
        if target in ENTRIES
    }
    assert not upward


def _imports_below(graph: dict[str, set[str]], name: str, under: str) -> set[str]:
    return {target for target in graph[name] if target == under or target.startswith(under + ".")}


def test_the_shared_words_import_nothing_of_the_package() -> None:
    graph = import_graph()
    assert graph["t2v_lightning.choices"] == set()
    assert graph["t2v_lightning.version"] == set()
    # and they are the words the Fisher methods use
    assert "t2v_lightning.choices" in graph["t2v_lightning.fisher.estimators"]


def test_prepare_imports_nothing_from_the_fisher_methods() -> None:
    graph = import_graph()
    assert "t2v_lightning.fisher.montecarlo" in graph["t2v_lightning.task2vec"]  # read at all
    assert not _imports_below(graph, "t2v_lightning.prepare", "t2v_lightning.fisher")


def test_no_module_imports_the_package_root(tmp_path: Path) -> None:
    graph = import_graph()
    assert not {name for name, targets in graph.items() if "t2v_lightning" in targets}
    # an import of the root is seen, in either form (the check above is not vacuous)
    for source in ("import t2v_lightning\n", "from t2v_lightning import __version__\n"):
        path = tmp_path / "example.py"
        path.write_text(source)
        assert imports_of(path, {"t2v_lightning", "t2v_lightning.version"}) == {"t2v_lightning"}


_CHOICE_WORDS = {"per_sample", "batch", "exact", "montecarlo", "variational"}


def test_estimators_and_methods_are_dispatched_through_tables() -> None:
    """No ``== "per_sample"``-style comparison with an estimator or method name outside
    ``choices.py``, and no ``isinstance`` test on a method's settings in ``task2vec.py``."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "choices.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if {side.value for side in sides if isinstance(side, ast.Constant)} & _CHOICE_WORDS:
                    found.append(f"{path.name}:{node.lineno}")
            is_settings_test = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and "Settings" in ast.unparse(node.args[1])
            )
            if is_settings_test and path.name == "task2vec.py":
                found.append(f"{path.name}:{node.lineno}")
    assert not found
