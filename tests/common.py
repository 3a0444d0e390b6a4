"""Helpers shared by the tests (fixtures are in conftest.py)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
# The small generated synthetic dataset of the `tiny_synthetic` fixture.
TINY_SYNTHETIC = {"num_train": 32, "num_val": 6, "image_size": (64, 96)}


def load_tool(name: str):
    """tools/<name>.py as a module, to call its main() as the command line would."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
