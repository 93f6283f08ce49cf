"""What the modules of a package import, read off their source (relative imports resolved)."""

import ast
from pathlib import Path
from types import ModuleType


def imported_modules(package: ModuleType) -> dict[str, set[str]]:
    """File name -> the absolute names each module directly in `package` imports (a `from x import y`
    counts as x and x.y, since y may be a module)."""
    found = {}
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                parts = package.__name__.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] if node.level else [])
                module = ".".join(filter(None, (base, node.module)))
                names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        found[path.name] = names
    return found
