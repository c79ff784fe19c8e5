"""The import graph stays one-directional: no cycles among modules (lazy imports inside functions count, imports
only for type checkers do not), and the torch side (`ripper_export`) never imports the runtime (`ripper_dist`)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ripper_dist": ROOT / "ripper_dist", "ripper_export": ROOT / "export"}


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(package: str, path: Path, typing_too: bool = False) -> set[str]:
    """Modules of our two packages imported anywhere in the file (resolved to module names); imports only for type
    checkers too with `typing_too`."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child) and not typing_too:
                continue
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = package + ("." + base if base else "")
                names = [f"{base}.{a.name}" for a in child.names] + [base]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            else:
                visit(child)
                continue
            found.update(n for n in names if n.split(".")[0] in PACKAGES)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"{pkg}.{p.stem}": p for pkg, d in PACKAGES.items() for p in d.glob("*.py") if p.stem != "__init__"}
    return {m: {i for i in _imports(m.split(".")[0], p) if i in modules and i != m} for m, p in modules.items()}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = dfs(n)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 20 and graph["ripper_dist.separator"]  # the graph was really read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_torch_side_does_not_import_the_runtime():
    graph = _graph()
    upward = {m: sorted(d for d in deps if d.startswith("ripper_dist."))
              for m, deps in graph.items() if m.startswith("ripper_export.")}
    assert not any(upward.values()), upward


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _reached(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_the_ray_engine_depends_on_neither_the_planner_nor_the_cli():
    """`ray_pipeline` takes a planned job by its shape (`RayJob`): no import of `separator` or `cli`, even lazily or
    for type checkers."""
    planner = {"ripper_dist.separator", "ripper_dist.cli", "ripper_dist.api"}
    assert not _imports("ripper_dist", PACKAGES["ripper_dist"] / "ray_pipeline.py", typing_too=True) & planner
    reached = _reached(_graph(), "ripper_dist.ray_pipeline")
    assert not reached & planner, sorted(reached)


def test_the_family_table_is_a_leaf():
    """`family_registry` imports nothing of the package: the catalogue, the options and the workers all read it."""
    assert _graph()["ripper_dist.family_registry"] == set()
    assert "ripper_dist.family_registry" in _reached(_graph(), "ripper_dist.model_ref")
