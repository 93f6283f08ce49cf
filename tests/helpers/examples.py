"""The scripts under examples/ loaded by file path, as the modules the scripts name each other by."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as module `name`, loaded once and kept in sys.modules: the scripts import each
    other by bare name, so a script another one imports must be loaded first."""
    path = EXAMPLES / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None:
        assert Path(loaded.__file__) == path, f"module {name} is {loaded.__file__}, not the example script"
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"no example script {name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
