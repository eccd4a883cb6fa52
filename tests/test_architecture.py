"""The map of docs/ARCHITECTURE.md, checked on the source: no import cycle between lightq's modules (imports inside
functions included), ``kernels/`` a library importing nothing else of lightq, ``models/`` importing only the ground
floor (``errors``, ``paths``, ``progress``), no private name imported across packages, and decisions about a
backend taken by its declared capabilities, not by its name."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightq"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every lightq import in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found += [(target, alias.name) for alias in node.names if target.startswith("lightq")]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("lightq")]
    return found


def edges() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for module, imported in imports(name):
            full = f"{module}.{imported}"
            target = full if full in MODULES else module
            if target in MODULES and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def test_no_import_cycle():
    graph, state, cycles = edges(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_kernels_and_models_stand_on_the_ground_floor():
    graph = edges()
    ground = ("lightq.errors", "lightq.paths", "lightq.progress")
    for package, allowed in (("lightq.kernels", ("lightq.kernels",)), ("lightq.models", ("lightq.models", *ground))):
        outside = sorted((m, t) for m in graph if m.startswith(package) for t in graph[m]
                         if not t.startswith(allowed) and t != "lightq")
        assert not outside, f"{package} imports {outside}"


def test_no_private_name_crosses_packages():
    crossing = [f"{name}: {module}.{imported}" for name in MODULES for module, imported in imports(name)
                if imported.startswith("_") and not imported.startswith("__")
                and module.split(".")[:2] != name.split(".")[:2]]
    for path in (ROOT / "plugins").rglob("*.py"):  # plugins use lightq's public names only
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("lightq"):
                crossing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossing, crossing


def test_backend_decisions_ask_capabilities_not_names():
    """The string "triton" names a backend only in the triton backend itself (and its spec), the attention triton
    backend's spec, the measured preference tables (linear and attention), the library's own version / cache
    folder in bench, and LightX2V's kernel names in ``lightx2v/keys.py`` (its config values, not lightq's backend)."""
    allowed = {"lightq/backends/triton_backend.py", "lightq/backends/triton_spec.py", "lightq/backends/registry.py",
               "lightq/attention/specs.py", "lightq/attention/registry.py", "lightq/bench/timing.py",
               "lightq/bench/pipeline.py", "lightq/lightx2v/keys.py"}
    found = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                   if re.search(r"""["']triton["']""", p.read_text()) and str(p.relative_to(ROOT)) not in allowed)
    assert not found, f"backend name 'triton' compared outside its backend: {found}"
