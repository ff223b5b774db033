"""The package's dependency arrows point one way (docs/architecture.md, "Layers").

Every import in sora_train/ and data_tools/ — module level or inside a function, absolute or
relative; not those under ``if TYPE_CHECKING:`` — is read from the source (nothing is
imported) and checked:
- a package may import only from packages of a lower layer, or from itself;
- the four model-and-data packages (data, models, rewrite, diffusion) do not import each other;
- cli and data_tools (the entry layers) do not import each other;
- no cycle between modules;
- no private name (``_x``) imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sora_train": ROOT / "sora_train", "sora_train.data_tools": ROOT / "data_tools"}

# Lower number = lower layer. Same number: siblings, which must not import each other.
LAYERS = {
    "root": 0, "utils": 0,
    "data": 1, "models": 1, "rewrite": 1, "diffusion": 1,
    "provenance": 2, "parallel": 2,
    "training": 3,
    "cli": 4, "data_tools": 4,
}
SIBLINGS_MAY_IMPORT = {("root", "utils"), ("utils", "root")}  # the package root only re-exports a version


def _module_name(base: str, root: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
    return ".".join([base, *parts])


def _walk(node: ast.AST):
    """ast.walk, minus ``if TYPE_CHECKING:`` blocks (annotations only: nothing runs)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            for other in child.orelse:
                yield from _walk(other)
            continue
        yield from _walk(child)


def _imports() -> dict[str, list[tuple[str, tuple[str, ...], int]]]:
    """module -> [(imported module, names, line)] for every sora_train import."""
    found: dict[str, list[tuple[str, tuple[str, ...], int]]] = {}
    for base, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            mod = _module_name(base, root, path)
            pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
            out = found.setdefault(mod, [])
            for node in _walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    out += [(a.name, (), node.lineno) for a in node.names if a.name.split(".")[0] == "sora_train"]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        target = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.split(".")[0] == "sora_train":
                        out.append((target, tuple(a.name for a in node.names), node.lineno))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1]


def test_every_package_has_a_layer():
    tops = {p.name for p in (ROOT / "sora_train").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert tops <= set(LAYERS), f"add {sorted(tops - set(LAYERS))} to LAYERS (and to docs/architecture.md)"


def test_imports_point_down_the_layers():
    wrong = []
    for mod, imports in _imports().items():
        a = _layer(mod)
        for target, _, line in imports:
            b = _layer(target)
            if a == b or (a, b) in SIBLINGS_MAY_IMPORT:
                continue
            if LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{mod}:{line} imports {target} ({a} -> {b})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_private_names_across_modules():
    wrong = []
    for mod, imports in _imports().items():
        for target, names, line in imports:
            private = [n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
            if private and target != mod:
                wrong.append(f"{mod}:{line} imports {', '.join(private)} from {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    modules = _imports()
    graph = {m: {t for t, _, _ in imps if t in modules and t != m} for m, imps in modules.items()}
    # "from pkg import mod" names a submodule: an edge to it too
    for m, imps in modules.items():
        for t, names, _ in imps:
            graph[m] |= {f"{t}.{n}" for n in names if f"{t}.{n}" in modules and f"{t}.{n}" != m}
    # A package's __init__ re-exporting its own submodules is not a cycle with them.
    def own(a: str, b: str) -> bool:
        return b.startswith(a + ".") or a.startswith(b + ".")

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if own(m, t):
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_wrong_arrow(tmp_path, monkeypatch):
    """The walker is not vacuous: a data module importing training is reported."""
    pkg = tmp_path / "sora_train"
    (pkg / "data").mkdir(parents=True)
    (pkg / "training").mkdir()
    for d in (pkg, pkg / "data", pkg / "training"):
        (d / "__init__.py").write_text("")
    (pkg / "data" / "bad.py").write_text("def f():\n    from sora_train.training.recipe import build_dit_task\n")
    (pkg / "training" / "recipe.py").write_text("from sora_train.data import bad\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGES", {"sora_train": pkg})
    with pytest.raises(AssertionError, match=r"sora_train\.data\.bad:2 imports sora_train\.training\.recipe \(data -> training\)"):
        test_imports_point_down_the_layers()
    with pytest.raises(AssertionError, match=r"import cycles:\n.*sora_train\.data\.bad"):
        test_no_import_cycles()
