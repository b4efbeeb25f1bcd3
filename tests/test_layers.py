"""The house's layers point one way (ARCHITECTURE.md): every import of a peftlab or widgets
module, at module level or inside a function, goes to a module of the same layer or a layer
before it, and no chain of imports comes back to where it started.

Imports under ``if TYPE_CHECKING:`` are annotations only (never run) and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# first layer first; a module's layer is that of its top-level name under peftlab/ (or widgets)
LAYERS = (
    ("errors",),
    ("models", "data", "provenance", "progress"),
    ("inject", "state", "routing"),  # the injector and the adapter state
    ("methods", "quant"),
    ("production",),  # peft bridge, fused kernels, merged production paths
    ("api",),
    ("compose",),
    ("io",),
    ("xlora_io",),  # X-LoRA's experts on disk and in peft (hooks registered into the methods)
    ("memory", "metrics", "spectra", "evaluation", "plots", "tasks", "preview", "doctor", "deploy"),  # analysis
    ("train", "bench", "bench_learn", "bench_peak", "bench_serve", "bench_deploy", "bench_options", "export", "cli", "study", "report", "exercises", "tracking"),
    ("__init__",),  # the facade: `import peftlab`
    ("widgets",),
)


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of peftlab/ and widgets/."""
    found = {}
    for package in ("peftlab", "widgets"):
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = file
    return found


MODULES = module_files()


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = "widgets" if parts[0] == "widgets" else ("__init__" if len(parts) == 1 else parts[1])
    for index, names in enumerate(LAYERS):
        if key in names:
            return index
    raise AssertionError(f"{module} has no layer: add its name to LAYERS and ARCHITECTURE.md")


def runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, module-level or local, skipping TYPE_CHECKING blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def project_module(name: str) -> str | None:
    """The project module an imported name lives in (``peftlab.widgets`` is the widgets package)."""
    if name.startswith("peftlab.widgets"):
        name = "widgets" + name[len("peftlab.widgets"):]
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    file = MODULES[module]
    out = set()
    for node in runtime_imports(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = project_module(name)
            if target and target != module and not module.startswith(target + "."):
                out.add(target)  # a package's own __init__ is not an import of the package
    return out


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_goes_up_a_layer():
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in GRAPH.items() for b in targets if layer_of(b) > layer_of(a))
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    """Depth-first search for a back edge; the cycle found is printed whole."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_local_and_relative_imports(tmp_path):
    """The parser counts a function-local import and skips a TYPE_CHECKING one."""
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    from peftlab import api\n"
                     "def f():\n    from peftlab.io import save_adapter\n")
    found = [ast.unparse(n) for n in runtime_imports(tree)]
    assert found == ["import os", "from peftlab.io import save_adapter"]
    assert "peftlab.api" in GRAPH["peftlab.compose"]  # compose's local `from peftlab.api import adapt`


def test_architecture_md_names_every_layer():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for names in LAYERS:
        for name in names:
            shown = "peftlab/__init__.py" if name == "__init__" else name
            assert shown in text, f"ARCHITECTURE.md does not place {shown!r}"


def test_pyproject_installs_every_package():
    """A package split out of a module must be listed for a built (non-editable) install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m.replace("widgets", "peftlab.widgets", 1) if m.startswith("widgets") else m
             for m, f in MODULES.items() if f.name == "__init__.py"}
    assert found == listed, f"missing: {sorted(found - listed)}, stale: {sorted(listed - found)}"
