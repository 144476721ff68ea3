"""Import the repository's scripts (train.py, bench/*.py) as modules, to call their functions in-process."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str, name: str):
    """The module of the script at `ROOT/relative_path`, imported under `name`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
