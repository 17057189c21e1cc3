"""The layers' dependency rules (ARCHITECTURE.md), on every import, inside functions too.

serving/ is layered: cli > triton_flags (its Triton flags) > commands | workers > process
> server > frontends > data plane (dataplane > contract, its plain values > classification
| shared_memory) > models > batching | runtime (siblings: batching depends on
serving/types.py's Instance protocol, never on the runtime); errors, settings and types
are shared by all, and observability is used by all and uses only those. The runtime
imports neither asyncio nor gRPC nor the protocol's service messages; front ends never
reach around the data plane into models/, batching/ or runtime/; clients/ and export/
never import the server; and no module imports itself back through others (no cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

from support import ROOT

PACKAGES = {"serving": "onnxserve.serving", "clients": "onnxserve.clients",
            "export": "onnxserve.export", "protos": "onnxserve.protos",
            "benchmarks": "onnxserve.benchmarks"}
SHARED = ("errors", "settings", "types")
#: serving layer -> rank; a module may import layers of lower rank, the shared modules and
#: observability, and modules of its own layer
RANKS = {"cli": 9, "triton_flags": 8.5, "commands": 8, "workers": 8, "process": 7,
         "server": 6, "frontends": 5,
         "dataplane": 4.5, "handlers": 4.4, "contract": 4.25, "classification": 4,
         "shared_memory": 4,
         "models": 3, "batching": 1, "runtime": 1,
         "observability": 0}
#: layer -> the lower layers it may not reach around its neighbour to import
#: (ARCHITECTURE.md: front ends know only the data plane, never the model lifecycle below)
NEVER_AROUND = {"frontends": ("models", "batching", "runtime")}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The onnxserve modules ``name`` imports anywhere in its file (names resolved to
    modules: ``from package import module`` counts the module)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target.startswith("onnxserve.") and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["onnxserve", "serving"] and len(parts) > 2 else None


def _third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_serving_layers_import_only_downwards() -> None:
    wrong = []
    for module, imported in GRAPH.items():
        layer = _layer(module)
        if layer is None:
            continue
        for target in imported:
            other = _layer(target)
            if target.startswith(("onnxserve.clients", "onnxserve.export",
                                  "onnxserve.benchmarks")) and layer not in (
                                      "commands", "cli", "process"):
                wrong.append(f"{module} -> {target}")
            if other is None or other in SHARED or other == layer:
                continue
            if layer in SHARED:
                wrong.append(f"{module} -> {target} (shared modules import no layer)")
            elif other == "observability":
                continue
            elif other in ("cli", "commands") and layer != "cli":
                wrong.append(f"{module} -> {target} (nothing imports the commands)")
            elif RANKS[other] >= RANKS[layer]:
                wrong.append(f"{module} -> {target} ({layer} may not import {other})")
    assert not wrong, "\n".join(sorted(wrong))


def _reaching_around(graph: dict[str, set[str]]) -> list[str]:
    """The imports in ``graph`` that go downwards but skip a layer NEVER_AROUND forbids."""
    return sorted(f"{module} -> {target} ({_layer(module)} may not reach around to "
                  f"{_layer(target)})"
                  for module, imported in graph.items()
                  for target in imported
                  if _layer(target) in NEVER_AROUND.get(_layer(module) or "", ()))


def test_no_layer_reaches_around_another() -> None:
    wrong = _reaching_around(GRAPH)
    assert not wrong, "\n".join(wrong)


def test_reaching_around_is_seen() -> None:
    """The rule reads layers, not names: a front end importing the runtime, batching or a
    model module fails it; the data plane and the shared modules do not."""
    frontend = "onnxserve.serving.frontends.grpc_service"
    below = {"onnxserve.serving.runtime.instance", "onnxserve.serving.batching.scheduler",
             "onnxserve.serving.models.registry"}
    allowed = {"onnxserve.serving.dataplane", "onnxserve.serving.errors",
               "onnxserve.serving.observability.statistics", "onnxserve.protos.codec"}
    assert len(_reaching_around({frontend: below | allowed})) == len(below)


def test_the_runtime_knows_no_asyncio_grpc_or_service_messages() -> None:
    for module, path in MODULES.items():
        if _layer(module) != "runtime":
            continue
        assert not {"asyncio", "grpc"} & _third_party(path), module
        assert "onnxserve.protos.inference_pb2" not in GRAPH[module], module
        assert "onnxserve.protos.inference_pb2_grpc" not in GRAPH[module], module


def test_clients_and_export_never_import_the_server() -> None:
    wrong = [f"{m} -> {t}" for m, targets in GRAPH.items()
             if m.startswith(("onnxserve.clients", "onnxserve.export", "onnxserve.protos"))
             for t in targets if t.startswith("onnxserve.serving")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_the_rules_see_real_imports() -> None:
    """The checks above would pass on an empty graph: make sure they read imports."""
    assert "onnxserve.serving.batching.scheduler" in GRAPH["onnxserve.serving.models.model"]
    assert "onnxserve.serving.types" in GRAPH["onnxserve.serving.batching.scheduler"]
    # function-level imports count
    assert "onnxserve.serving.commands.demo" in GRAPH["onnxserve.serving.cli"]


def test_serving_type_checks() -> None:
    from support.typecheck import typecheck

    result = typecheck()
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_test_module_imports_another():
    """Test modules live in tests/unit/ (they start no server) or tests/served/, and the
    helpers they share live in the package tests/support/ (``from support.served import
    start_server``): no test module, support module or conftest.py imports a test module,
    a conftest.py (pytest loads those itself) or a test folder."""
    tests = ROOT / "tests"
    files = sorted(tests.rglob("*.py"))
    local = {path.stem for path in files if "support" not in path.relative_to(tests).parts}
    local |= {path.name for path in tests.iterdir() if path.is_dir() and path.name != "support"}
    offenders = []
    for path in files:
        where = path.relative_to(tests)
        if path.name.startswith("test_") and where.parts[0] not in ("unit", "served"):
            offenders.append(f"{where} is a test module outside unit/ and served/")
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and not node.level else [])
            offenders += [f"{where} imports {n}" for n in names if n.split(".")[0] in local]
    assert offenders == []
