"""The scripts of benchmarks/ imported as modules, for tests of their pure parts (no timing is ever tested)."""
import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str):
    """benchmarks/<name>.py as a module (its folder on sys.path while it imports, for its `from common import`)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
