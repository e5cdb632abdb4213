"""The package's shape: layers import only downward, no import circle, no source file over 500 lines, and
nothing in the library imports the benchmarks (docs/layout.md draws the picture these tests hold true)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deltatune"

# Bottom to top. A module may import its own layer and the ones below; the most specific prefix decides.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "compat", "runtime.atomic", "runtime.threads", "runtime.assets", "runtime.huge_pages"),
    ("kernels",),
    ("config", "io", "tuners"),
    ("model",),
    ("runtime",),
    ("saved", "data", "generation"),
    ("train", "export", "bench", "serve"),
    ("cli",),
]
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``deltatune.<module>``: the one whose longest prefix matches it."""
    inner = module.removeprefix("deltatune").removeprefix(".")
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (inner == prefix or inner.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it there (and in docs/layout.md)")
    return best


def imports(path: Path) -> set[str]:
    """Every deltatune module ``path`` imports, at the top or inside a function (a lazy import is a dependency too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deltatune"):
            for alias in node.names:  # ``from deltatune.x import y``: y may be a module of x
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("deltatune"))
    return {name for name in found if name != "deltatune"}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
MODULES = {module_name(p): p for p in SOURCES}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "deltatune"])
def test_a_module_imports_only_its_layer_and_below(module):
    own = layer_of(module)
    upward = sorted(name for name in imports(MODULES[module]) if layer_of(name) > own)
    assert not upward, f"{module} (layer {own}) imports upward: {upward}"


def test_the_package_root_imports_only_the_core():
    assert all(layer_of(name) <= layer_of("deltatune.model") for name in imports(MODULES["deltatune"]))


def test_no_import_circle():
    graph = {module: {n for n in imports(path) if n in MODULES and n != module} for module, path in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(module) :], module]))
        if module in done:
            return
        for name in sorted(graph[module]):
            if not name.startswith(module + "."):  # a package importing its own submodules is not a circle
                visit(name, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_nothing_in_the_library_imports_the_benchmarks():
    users = [
        m
        for m, p in MODULES.items()
        if not m.startswith(("deltatune.bench", "deltatune.cli.bench"))
        and any(n.startswith("deltatune.bench") for n in imports(p))
    ]
    assert not users


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_no_source_file_is_over_500_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by purpose"


def test_the_readme_stays_a_short_path():
    """README is the newcomer's path (at most 15,000 characters); long material belongs in docs/."""
    readme = PACKAGE.parents[1] / "README.md"
    size = len(readme.read_text(encoding="utf-8"))
    assert size <= 15_000, f"README.md has {size:,} characters: move detail to docs/ and link it"
