"""The shape of the code: every module imports alone (no import cycles), ``hpc`` never imports
``megdet``, and the command line answers without importing torch where it needs none."""
import ast
import subprocess
import sys
import textwrap

import pytest

from tests.multirank import REPO

PACKAGES = ("hpc", "megdet")


def all_modules():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_every_module_imports_alone_and_hpc_never_imports_megdet():
    """One fresh interpreter per module: an import cycle fails only when its first module is imported
    first, so importing them all in one process would hide it."""
    script = """
        import json, os, subprocess, sys
        from concurrent.futures import ThreadPoolExecutor

        def probe(name):
            code = ("import importlib, sys; importlib.import_module(%r); "
                    "print(sorted(m for m in sys.modules if m == 'megdet' or m.startswith('megdet.')))" % name)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode:
                return name, done.stderr.strip().splitlines()[-1]
            if name.startswith("hpc") and done.stdout.strip() != "[]":
                return name, "imports " + done.stdout.strip()
            return None

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            print(json.dumps([f for f in pool.map(probe, json.loads(sys.argv[1])) if f]))
    """
    import json

    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), json.dumps(list(all_modules()))],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["job", "--scheduler", "slurm", "--gpus", "160", "--gpus-per-node",
                                                "16", "--config", "largedet_coco_12min"],
                                  ["synth", "--help"], ["train", "no_such_preset"], ["bench", "--help"],
                                  ["train", "shapes_r18_cpu", "solver.max_iter=-1"]])
def test_the_command_line_answers_without_importing_torch(argv):
    done = python(f"""
        import sys
        from megdet.cli import main
        try:
            status = main({argv!r})
        except SystemExit as exit:
            status = exit.code
        print("torch" in sys.modules, status, file=sys.stderr)
    """)
    imported, status = done.stderr.strip().splitlines()[-1].split()
    assert imported == "False", done.stderr
    assert status in ("0", "2"), done.stderr


def test_no_module_name_is_shared_by_hpc_and_megdet():
    """``hpc.memory`` beside ``megdet.memory`` read as one thing in two places: each name says what its
    module does, once. ``megdet.bench.X`` is exempt: it is the command ``megdet bench X``, the benchmark of X."""
    names = {package: {module.rsplit(".", 1)[-1] for module in all_modules()
                       if module.startswith(package + ".") and not module.startswith("megdet.bench.")}
             for package in PACKAGES}
    shared = names["hpc"] & names["megdet"]
    assert not shared, f"modules named alike in hpc and megdet: {sorted(shared)}"


def import_graph() -> dict:
    """Module -> the project modules it imports anywhere in its file (function-level imports included),
    from the source alone: ``import a.b``, ``from a import b`` (module b, else a), relative imports."""
    modules = set(all_modules())
    graph = {}
    for name in modules:
        parts = name.split(".")
        path = REPO.joinpath(*parts)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        package = parts if path.name == "__init__.py" else parts[:-1]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # import a.b.c imports the package a.b too
                    target = target.rpartition(".")[0]
                if target and target != name:
                    imported.add(target)
        graph[name] = imported
    return graph


def find_cycle(graph: dict):
    """One import cycle of ``graph`` as a list of modules (first repeated last), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = import_graph()
    assert "hpc.errors" in graph["hpc.launch"] and "hpc.launch_env" in graph["hpc.errors"], "the graph sees imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert not any(target.startswith("megdet") for name, targets in graph.items() if name.startswith("hpc")
                   for target in targets), "hpc imports nothing of megdet"


def fixtures_defined_in(path):
    """Names of the functions in a test module decorated with ``pytest.fixture`` (with or without
    arguments)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) in ("pytest.fixture", "fixture"):
                    names.add(node.name)
    return names


def test_fixtures_are_asked_for_by_name_never_imported_from_another_test_module():
    """A fixture imported into a test module and called is an error at run time only (pytest refuses a
    direct call), and only in the tests that reach the call: the shared ones live in conftest.py."""
    tests = REPO / "tests"
    fixtures = {f"tests.{path.stem}": fixtures_defined_in(path) for path in tests.glob("*.py")}
    assert {"job_env", "slurm"} <= fixtures["tests.conftest"], "the scan finds fixtures"
    imported = []
    for path in sorted(tests.glob("*.py")):
        if path.name == "conftest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in fixtures:
                imported += [f"{path.name}: {alias.name} from {node.module}" for alias in node.names
                             if alias.name in fixtures[node.module]]
    assert not imported, "fixtures imported instead of asked for (move them to conftest.py): " + "; ".join(imported)
