"""``fedsim.adapters`` is the bottom layer: the adapters, their initialisation and the state vocabulary import nothing of
fedsim above them (no method, runtime or config), so the methods, the engine and the runtime all build on it."""

import ast
from pathlib import Path

ADAPTERS = Path(__file__).resolve().parents[2] / "fedsim" / "adapters"
BELOW = ("fedsim.adapters", "fedsim.errors")  # what fedsim.adapters may import of fedsim


def fedsim_imports(path: Path) -> set[str]:
    """Every fedsim module ``path`` imports, at the top, inside functions or under TYPE_CHECKING."""
    package = "fedsim.adapters"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package itself, or above it
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.add(module)
    return {name for name in found if name == "fedsim" or name.startswith("fedsim.")}


def test_adapters_import_nothing_above_them():
    files = sorted(ADAPTERS.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "state.py", "export.py", "layers.py", "init.py"}
    above = {f"{path.name}: {name}" for path in files for name in fedsim_imports(path)
             if not any(name == below or name.startswith(below + ".") for below in BELOW)}
    assert not above, sorted(above)


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: an import of fedsim.methods inside a function is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from fedsim.methods.base import Method\n    from . import state\n")
    assert fedsim_imports(path) == {"fedsim.methods.base", "fedsim.adapters"}
