"""Shared test setup: tests run on CPU, deterministic, and use the checkout's packages."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402  (torch before decord, always)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def load_example():
    """A function that imports a script of examples/ (not a package) as a module: load_example("demo.py")."""
    return _load_example


def _load_example(filename: str):
    import importlib.util

    path = os.path.join(ROOT, "examples", filename)
    spec = importlib.util.spec_from_file_location(f"fusion_example_{filename.removesuffix('.py')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): they run fastest
    on one thread; with two, on shared cores, every tiny parallel op can wait for a descheduled worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
