import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trainings and whole-tool runs (the fast set: -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
