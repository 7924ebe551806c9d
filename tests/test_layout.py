"""The folder tree is the architecture: imports run one way, with no cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llama_sft"

# Lower layers first; a module imports only from its own layer or those before it. The speed-ups
# sit below training, which installs them.
LAYERS = [
    {"options", "quiet"},
    {"data"},
    {"checks", "peft_modules"},
    {"loading"},
    {"speedups"},
    {"training"},
    {"tools"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["llama_sft", *parts])


def imports_of(path: Path) -> set[str]:
    """The llama_sft modules ``path`` imports, at the top or inside functions."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                # ``from .. import speedups`` names a module; ``from .x import y`` a name in x.
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("llama_sft")}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    return next(i for i, members in enumerate(LAYERS) if top in members)


def test_every_top_level_module_has_a_layer():
    tops = {name.split(".")[1] for name in MODULES if "." in name}
    assert tops <= set().union(*LAYERS), tops - set().union(*LAYERS)


def test_imports_run_one_way():
    upward = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name != "llama_sft"
        for target in imports_of(path)
        if target != "llama_sft" and layer(target) > layer(name)
    ]
    assert upward == []


def test_no_import_cycle_between_modules():
    graph = {
        name: {t for t in imports_of(path) if t in MODULES and t != name} for name, path in MODULES.items()
    }
    # A package's __init__ importing its own modules is how a package exposes them, not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(trail[trail.index(node) :] + [node])
            return
        visiting.add(node)
        for target in sorted(graph[node]):
            visit(target, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []


def test_only_the_command_line_entry_reads_sys_argv():
    readers = [
        name for name, path in MODULES.items() if "sys.argv" in path.read_text().replace("``sys.argv``", "")
    ]
    assert readers == ["llama_sft.cli"]
