import sys

import pytest
import torch

from aa_detection.utils import memory
from aa_detection.utils.memory import measure_peak_memory

MiB = 1 << 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")


def _allocate(nbytes):
    def fn():
        torch.ones(nbytes // 4, dtype=torch.float32)  # touched, then freed

    return fn


@pytest.mark.parametrize("size_mib", [64, 256])
def test_cpu_peak_of_a_known_allocation(size_mib):
    peak = measure_peak_memory(_allocate(size_mib * MiB))
    assert size_mib * MiB * 0.95 < peak < size_mib * MiB + 24 * MiB


def test_cpu_peak_resets_between_calls():
    measure_peak_memory(_allocate(256 * MiB))
    assert measure_peak_memory(_allocate(16 * MiB)) < 40 * MiB


def test_forked_child_fallback(monkeypatch):
    monkeypatch.setattr(memory, "_reset_peak_rss", lambda: False)
    peak = measure_peak_memory(_allocate(128 * MiB))
    assert 128 * MiB * 0.95 < peak < 128 * MiB + 24 * MiB


def test_forked_child_failure_carries_its_traceback(monkeypatch):
    def fails():
        raise ValueError("no such layer: res9")

    monkeypatch.setattr(memory, "_reset_peak_rss", lambda: False)
    with pytest.raises(RuntimeError, match="(?s)failed in the forked child.*ValueError: no such layer: res9"):
        measure_peak_memory(fails)


def test_unsupported_device_raises():
    with pytest.raises(ValueError, match="device"):
        measure_peak_memory(lambda: None, device="meta")
