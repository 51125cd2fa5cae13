"""The server package's imports run one way: no cycle, and the layer contract holds.

Imports inside functions count too: a cycle hidden in a function body is
still a cycle, it only fails later and in a harder place to see.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "server"
LEAVES = ("server.settings", "server.errors", "server.adapters.ids", "server.json_input")


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `module` imports, at any depth of its AST (functions, TYPE_CHECKING too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                         for alias in node.names)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _imported(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS: no recursion limit to hit)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_server_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "server.app" in graph and graph["server.app"], "the graph builder found no imports"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    """The check itself can fail: a cycle closed only inside a function body is found."""
    module = tmp_path / "settings.py"
    module.write_text("import os\n\n\ndef check():\n    from server.api.auth import load\n    import server.app\n")
    known = {"server.settings", "server.api.auth", "server.app"}
    assert _imported("server.settings", module, known) == {"server.api.auth", "server.app"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_no_other_project_module(leaf: str) -> None:
    graph = import_graph()
    assert not graph[leaf], f"{leaf} imports {sorted(graph[leaf])}"


def test_adapters_know_neither_settings_nor_api() -> None:
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("server.adapters"):
            bad = {m for m in imports if m == "server.settings" or m.startswith(("server.api", "server.app"))}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_layer_contract_holds() -> None:
    """import-linter's contracts in pyproject.toml ([tool.importlinter]), run as `make test` runs them."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "import-linter is not installed (pip install -e '.[dev]')"
    done = subprocess.run([exe, "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
