import pytest
import torch

from common import TINY_SYNTHETIC


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trainings and whole-tool runs (the fast set: -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """Root of a small generated synthetic dataset (TINY_SYNTHETIC), made once per session."""
    from aa_detection.data import ensure_synthetic_dataset

    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    return ensure_synthetic_dataset(root, **TINY_SYNTHETIC)
