"""The library's layers import one way, and no module reaches into another's private names.

ckpt_lib's sub-packages, bottom to top: `layout` (pure rules) < `io` (file formats) < `transport`
(queue protocol) < `families` (name and config tables) < `engine` (loaders, savers, plans, writers).
A module imports its own layer and those below, never above; `ckpt_lib` never imports `ckpt_verify`
(verification only, not shipped into Megatron-LM checkouts), which may import anything of it. Imports
inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from util import PLUGINS

ORDER = ["layout", "io", "transport", "families", "engine"]
LIB = PLUGINS / "ckpt_lib"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PLUGINS).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in the file."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
    return found


def _layer(module: str) -> int | None:
    """Rank of a ckpt_lib module's layer; None for the package root (errors, __init__), usable by all."""
    parts = module.split(".")
    if parts[0] != "ckpt_lib" or len(parts) < 2 or parts[1] not in ORDER:
        return None
    return ORDER.index(parts[1])


def _targets(module: str, names: list[str]) -> list[str]:
    """The modules an import statement reaches (`from ckpt_lib.io import manifest` reaches ckpt_lib.io.manifest)."""
    out = []
    for name in names or [""]:
        candidate = f"{module}.{name}" if name else module
        path = PLUGINS / (candidate.replace(".", "/") + ".py")
        out.append(candidate if path.exists() or (PLUGINS / candidate.replace(".", "/")).is_dir() else module)
    return out


def test_every_library_module_is_in_a_layer():
    loose = [p.name for p in LIB.glob("*.py") if p.name not in ("__init__.py", "errors.py")]
    assert not loose, f"modules outside the layer sub-packages: {loose}"
    assert sorted(p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ORDER)


def test_imports_go_down_the_layers():
    wrong = []
    for path in sorted(LIB.rglob("*.py")):
        me = _module(path)
        mine = _layer(me)
        for line, module, names in _imports(path):
            if module.split(".")[0] == "ckpt_verify":
                wrong.append(f"{path.relative_to(PLUGINS)}:{line} imports {module} (verification only)")
            for target in _targets(module, names):
                theirs = _layer(target)
                if theirs is not None and (mine is None or theirs > mine):
                    wrong.append(f"{path.relative_to(PLUGINS)}:{line} ({ORDER[mine] if mine is not None else 'root'}) "
                                 f"imports {target} ({ORDER[theirs]})")
    assert not wrong, "\n".join(wrong)


def test_no_private_names_across_modules():
    """`from x import _y` and `x._y` on an imported module of ours are reaches into another's internals."""
    wrong = []
    for path in sorted(PLUGINS.rglob("*.py")):
        tree = ast.parse(path.read_text())
        ours = set()
        for line, module, names in _imports(path):
            if module.split(".")[0] not in ("ckpt_lib", "ckpt_verify"):
                continue
            wrong += [f"{path.relative_to(PLUGINS)}:{line} imports {module}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
            ours.update(n for n in names)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.relative_to(PLUGINS)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_plugin_modules_stay_thin():
    """The entry modules upstream's convert.py imports: flags and a call into the engine, nothing else."""
    for path in sorted(PLUGINS.glob("*_*.py")):
        assert len(path.read_text().splitlines()) <= 40, f"{path.name} is more than a thin entry module"
        for _, module, _ in _imports(path):
            assert module.split(".")[0] != "ckpt_lib" or module.startswith(("ckpt_lib.engine", "ckpt_lib.transport")), (
                f"{path.name} imports {module}: plugins call the engine")
