"""The import graph of ``detector/`` and ``gfl_ops/``: no cycles, and no import up a layer.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` statement, at module level or inside a function, plus
``importlib.import_module("literal")`` calls. An import of ``a.b.c`` also runs the
``__init__`` of the packages ``a.b`` and ``a`` above it, so those count as imported too, except
the packages that already contain the importing module (they are initialised before it runs).

Run as a script to print the edges between the modules and every cycle::

    python tests/test_import_layers.py
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("detector", "gfl_ops")

# detector's layers, lowest first: a module may import its own layer and the ones below, never
# one above. A module belongs to the layer of the longest prefix listed.
DETECTOR_LAYERS: tuple[tuple[str, ...], ...] = (
    ("detector.ops", "detector.data"),  # box geometry; datasets, transforms, loaders
    ("detector.config",),  # every configuration dataclass, the named experiments
    ("detector.models",),  # the network, its loss, assignment and post-processing
    ("detector.metrics", "detector.checkpoint"),  # COCO metrics; checkpoint files
    ("detector.engine",),  # training loop, evaluation loop, distributed set-up
    # commands and tools on top; detector.losses / detector.assigners are old import paths of
    # detector.models.losses / .assigners kept for benchmarks/
    (
        "detector.train",
        "detector.eval",
        "detector.infer",
        "detector.main_job",
        "detector.export",
        "detector.ablation",
        "detector.losses",
        "detector.assigners",
    ),
)


def discover_modules(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of ``packages``."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name that ``module`` imports (modules, or ``module.attribute`` guesses)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (
                    isinstance(node.func, ast.Name)
                    and node.func.id in ("import_module", "__import__")
                )
            )
        ):
            names.add(node.args[0].value)
    return names


def build_graph(
    root: Path = REPO, packages: Iterable[str] = PACKAGES
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(graph, raw)``: ``graph[m]`` the scanned modules that importing ``m`` imports (packages
    whose ``__init__`` runs included), ``raw[m]`` every dotted name ``m`` imports."""
    modules = discover_modules(root, packages)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    raw: dict[str, set[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        raw[mod] = _imported_names(tree, mod, path.name == "__init__.py")
        own_packages = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        for name in raw[mod]:
            # the longest prefix that is a module (``from pkg import name``: name may be an
            # attribute of pkg rather than a submodule)
            parts = name.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if not parts:
                continue
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != mod and target not in own_packages:
                    graph[mod].add(target)
    return graph, raw


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def layer_of(module: str) -> int | None:
    """Index in :data:`DETECTOR_LAYERS` of ``module`` (None for the bare ``detector`` package)."""
    best, best_len = None, -1
    for i, prefixes in enumerate(DETECTOR_LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``'a -> b'`` for every detector module ``a`` importing a module ``b`` of a higher layer."""
    out = []
    for mod in sorted(graph):
        src = layer_of(mod)
        if src is None:
            continue
        for target in sorted(graph[mod]):
            dst = layer_of(target)
            if dst is not None and dst > src:
                out.append(f"{mod} (layer {src}) -> {target} (layer {dst})")
    return out


@pytest.fixture(scope="module")
def graph_and_raw() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return build_graph()


def test_every_detector_module_has_a_layer(graph_and_raw):
    graph, _ = graph_and_raw
    missing = [m for m in graph if m.startswith("detector.") and layer_of(m) is None]
    assert not missing, f"add these modules to DETECTOR_LAYERS: {missing}"


def test_no_import_cycle_in_detector(graph_and_raw):
    graph, _ = graph_and_raw
    cycles = [c for c in find_cycles(graph) if any(m.split(".")[0] == "detector" for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def test_detector_imports_no_higher_layer(graph_and_raw):
    graph, _ = graph_and_raw
    up = upward_imports(graph)
    assert not up, "imports up a layer:\n" + "\n".join(up)


def test_models_do_not_import_losses_postprocess_or_engine(graph_and_raw):
    _, raw = graph_and_raw
    forbidden = ("detector.losses", "detector.postprocess", "detector.engine")
    bad = sorted(
        f"{m} -> {n}"
        for m, names in raw.items()
        if m == "detector.models" or m.startswith("detector.models.")
        for n in names
        if any(n == f or n.startswith(f + ".") for f in forbidden)
    )
    assert not bad, bad


def test_gfl_ops_imports_neither_detector_nor_benchmarks(graph_and_raw):
    _, raw = graph_and_raw
    bad = sorted(
        f"{m} -> {n}"
        for m, names in raw.items()
        if m.split(".")[0] == "gfl_ops"
        for n in names
        if n.split(".")[0] in ("detector", "benchmarks")
    )
    assert not bad, bad


def test_gfl_ops_has_no_import_cycle(graph_and_raw):
    graph, _ = graph_and_raw
    cycles = [c for c in find_cycles(graph) if c[0].split(".")[0] == "gfl_ops"]
    assert not cycles, f"import cycles: {cycles}"


def test_old_import_paths_are_the_new_modules():
    """benchmarks/ imports detector.losses and detector.assigners and replaces attributes of
    detector.losses: those names must be the very modules of detector.models, not copies."""
    import detector.assigners
    import detector.losses
    import detector.models.assigners
    import detector.models.losses

    assert detector.losses is detector.models.losses
    assert detector.assigners is detector.models.assigners


def test_graph_sees_a_cycle_through_a_package_init(tmp_path):
    """The graph counts the ``__init__`` an import runs: a lazy import in a package's
    ``__init__`` of a module that imports back into the package is a cycle."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text(
        "def __getattr__(name):\n    from pkg.sub import big\n    return big\n"
    )
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text("")
    (tmp_path / "pkg" / "sub" / "big.py").write_text("from pkg.up import x\n")
    (tmp_path / "pkg" / "up.py").write_text("from pkg.sub.leaf import y\n")
    graph, _ = build_graph(tmp_path, ("pkg",))
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.big", "pkg.up"]]
    assert "pkg" not in graph["pkg.up"]  # the package that holds pkg.up is not an edge


def main() -> int:
    graph, _ = build_graph()
    for mod in sorted(graph):
        for target in sorted(graph[mod]):
            print(f"{mod} -> {target}")
    cycles = find_cycles(graph)
    print(f"\n{len(cycles)} cycle(s)")
    for c in cycles:
        print("  " + " <-> ".join(c))
    up = upward_imports(graph)
    print(f"{len(up)} import(s) up a layer")
    for line in up:
        print("  " + line)
    return 1 if cycles or up else 0


if __name__ == "__main__":
    sys.exit(main())


def test_benchmarks_have_no_import_cycle_and_nothing_below_imports_them():
    """benchmarks/ is the top layer (docs/architecture.md): it may import detector and gfl_ops,
    nothing imports it, and its own modules form no cycle."""
    graph, raw = build_graph(packages=(*PACKAGES, "benchmarks"))
    cycles = [c for c in find_cycles(graph) if any(m.split(".")[0] == "benchmarks" for m in c)]
    assert not cycles, f"import cycles: {cycles}"
    up = sorted(
        f"{m} -> {n}"
        for m, names in raw.items()
        if m.split(".")[0] in PACKAGES
        for n in names
        if n.split(".")[0] == "benchmarks"
    )
    assert not up, up
