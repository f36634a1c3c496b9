import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TORCHMDX_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test tensors are tiny: on a 2-core machine intra-op threads cost far more than they
    save (measured up to 10x slower), so the whole session runs torch on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: folders of the checkout a test must not write into (the CLI's default cache folder is data/cache under the
#: working folder: a test that runs a command in the repository's root leaves its caches in the checkout)
CHECKOUT_OUTPUTS = (ROOT / "data" / "cache",)


def _listing():
    return {str(p) for folder in CHECKOUT_OUTPUTS if folder.is_dir() for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def no_outputs_in_the_checkout():
    """Fail the test that leaves files in the checkout's data/cache (run it in ``tmp_path``: ``monkeypatch.chdir``).
    Under ``-n 2`` a file written by the other worker's test may be charged to this one: run the named tests one by
    one to find the writer."""
    before = _listing()
    yield
    new = sorted(_listing() - before)
    if new:
        pytest.fail(f"the test wrote into the checkout: {', '.join(new[:3])} (run it in tmp_path)", pytrace=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample files (``../shared/data``); see its README."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"sample data not found at {SHARED_DATA} (set TORCHMDX_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def bench():
    """``bench/bench_accuracy.py`` loaded as a module (the accuracy race's tests), once per test file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "bench_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
