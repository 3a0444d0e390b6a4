import importlib
import logging
import os

import pytest
import torch

from common import TINY_SYNTHETIC


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trainings and whole-tool runs (the fast set: -m 'not slow')")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        missing = missing_dependencies()
        if missing:
            pytest.exit(f"CI: {', '.join(missing)} missing, so the tests that need them would only be skipped. "
                        "Install everything with `bash tools/install.sh` (README.md)", returncode=3)


def missing_dependencies():
    """What the full suite needs and this environment lacks: detectron2, timm, the compiled CPU kernel."""
    missing = []
    for name in ("detectron2", "timm"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    from aa_detection.layers.kernel import kernel_available

    if not kernel_available():
        missing.append("the CPU attention kernel aa_detection._C")
    return missing


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """Root of a small generated synthetic dataset (TINY_SYNTHETIC), made once per session."""
    from aa_detection.data import ensure_synthetic_dataset

    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    return ensure_synthetic_dataset(root, **TINY_SYNTHETIC)


@pytest.fixture
def flex_compiled_with(monkeypatch):
    """flex_compiled_with(backend) -> FlexAttention compiled by torch.compile with that backend, which the
    attention module then uses as it would Inductor's on CUDA (its output checks start afresh); dynamo is
    reset before and after the test, so the first size compiles static."""
    from aa_detection.layers import flex

    torch._dynamo.reset()
    saved = dict(vars(flex.FLEX_STATE))
    flex.FLEX_STATE.reset()  # as in a fresh process

    def compile_with(backend):
        compiled = torch.compile(flex._flex_attention, backend=backend, dynamic=None)
        monkeypatch.setattr(flex, "_compiled_torch_flex", lambda: compiled)
        return compiled

    yield compile_with
    vars(flex.FLEX_STATE).update(saved)
    torch._dynamo.reset()


@pytest.fixture
def aot_eager_flex(flex_compiled_with):
    """FlexAttention through torch.compile's front end (dynamo and AOT autograd) as on CUDA, with the aot_eager
    backend standing in for Inductor, and the counter of the graphs it compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    return flex_compiled_with(counter), counter


@pytest.fixture
def listen_to(caplog):
    """listen_to(name) -> caplog, which then receives the named logger's records also after detectron2's
    setup_logger stopped the "aa_detection" logger from propagating (a training earlier in the session)."""
    loggers = []

    def attach(name):
        loggers.append(logging.getLogger(name))
        loggers[-1].addHandler(caplog.handler)
        return caplog

    yield attach
    for logger in loggers:
        logger.removeHandler(caplog.handler)
