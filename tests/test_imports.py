"""The import graph of the library: no module imports back into a module that imports it (at module
level), so each can be read, tested and reused on its own."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facegen"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, path: Path, node: ast.stmt, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [base, *(f"{base}.{a.name}" for a in node.names)]
    return {n for n in names if n in known and n != module}


def _module_level_imports(in_functions: bool = False) -> dict[str, set[str]]:
    """module -> the facegen modules it imports when it is itself imported (top level, or under a
    top-level ``if`` / ``try``); ``in_functions``: the imports inside functions too."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    graph = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text())
        statements = [s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
        for block in (s for s in tree.body if isinstance(s, (ast.If, ast.Try))):
            statements += [s for s in ast.walk(block) if isinstance(s, (ast.Import, ast.ImportFrom))]
        if in_functions:
            statements = [s for s in ast.walk(tree) if isinstance(s, (ast.Import, ast.ImportFrom))]
        graph[module] = set().union(*(_imported(module, path, s, known) for s in statements)) if statements else set()
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_level_import_cycle_in_facegen():
    graph = _module_level_imports()
    assert len(graph) > 100 and "facegen.shards" in graph["facegen.train.loop"]  # the reader sees the imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_even_imports_inside_functions_make_no_cycle_but_mtcnns_backend_choice():
    """Settings never reach into the code that uses them, shards and lineage do not import each
    other; the one cycle left is MTCNN choosing its torch cascade, which imports MTCNN's geometry."""
    graph = _module_level_imports(in_functions=True)
    assert "facegen.lineage" in graph["facegen.shards"] and "facegen.shards" not in graph["facegen.lineage"]
    assert _cycles(graph) == [["facegen.models.mtcnn", "facegen.models.mtcnn_torch"]]


def test_settings_import_only_settings():
    """facegen.config validates YAML without importing the code the settings configure (even lazily);
    it may read facegen.templates, plain data that imports nothing of facegen."""
    graph = _module_level_imports(in_functions=True)
    reached = {m: sorted(i for i in imports if not i.startswith("facegen.config") and i not in ("facegen", "facegen.templates"))
               for m, imports in graph.items() if m.startswith("facegen.config")}
    assert {m: i for m, i in reached.items() if i} == {}
    assert graph["facegen.templates"] == set()


def test_loading_settings_imports_no_component():
    """Building the default settings imports no generator, embedder or expert module, and of the
    detectors only the default kind's module (its settings model), which imports no heavy library:
    a kind's module is imported only when a config names that kind."""
    import subprocess
    import sys

    code = ("import sys; from facegen.config import FacegenConfig, load_config; FacegenConfig(); load_config('configs/local.yaml'); "
            "print(sorted(m for m in sys.modules if m.startswith('facegen') and not m.startswith('facegen.config'))); "
            "print(sorted(m for m in ('torch', 'cv2', 'onnxruntime', 'dlib', 'diffusers', 'ray', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    facegen_modules, heavy = out.stdout.strip().splitlines()
    assert facegen_modules == ("['facegen', 'facegen.faces', 'facegen.faces.detect', 'facegen.faces.detectors', "
                               "'facegen.faces.detectors.mtcnn', 'facegen.templates']")
    assert heavy == "[]"


def test_no_library_module_imports_the_app_layer():
    """The CLI, the whole-pipeline driver, the demo and the HTML report sit on top: nothing below
    imports them, not even inside a function."""
    app = {"facegen.cli", "facegen.__main__", "facegen.pipeline", "facegen.demo", "facegen.eval.html_report"}
    graph = _module_level_imports(in_functions=True)
    assert app <= set(graph)
    assert {m: sorted(i & app) for m, i in graph.items() if m not in app and i & app} == {}
