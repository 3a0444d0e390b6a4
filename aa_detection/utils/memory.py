"""Peak memory of a call, on the GPU (allocator statistics) or the CPU (resident set size).

On the CPU, Linux keeps the peak resident set size of a process (VmHWM in /proc/self/status);
writing "5" to /proc/self/clear_refs resets it to the current size, so the peak of a call is VmHWM
after it minus VmRSS before it. Where clear_refs cannot be written, the call runs in a forked child,
whose peak starts at the parent's current size (the child runs on one thread). Both count pages the call newly touches, so the
measurement is only as good as freed memory goes back to the system: glibc serves allocations from
its heap below a threshold that grows as large blocks are freed; `measure_peak_memory` pins that
threshold at 128 KiB (mallopt) so that tensor buffers are mapped and unmapped one by one, and gives the
heap's free memory back (malloc_trim) when it pins and before each of its measurements (`PeakMemory`,
which brackets timed calls, only when it pins).

`PeakMemory` measures in the process itself (CUDA, or a CPU where clear_refs can be written) around a
block, so the block may also be timed; `measure_peak_memory` falls back to the forked child.
"""
import ctypes
import functools
import os
import re
import traceback
from typing import Any, Callable, Union

import torch

__all__ = ["PeakMemory", "measure_peak_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_pinned = False


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (mallopt, malloc_trim), else None: memory is then measured as is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _give_back_free_heap():
    """Return the heap's free memory to the system (malloc_trim), which would otherwise serve a measured
    allocation without new pages. It walks the heap: not done before timed calls."""
    glibc = _glibc()
    if glibc is not None:
        glibc.malloc_trim(0)


def _pin_malloc_thresholds() -> bool:
    """Make glibc map every block above 128 KiB on its own and return it on free (once per process);
    True when this call pinned them (what the heap holds free from before is then still to give back)."""
    global _malloc_pinned
    if _malloc_pinned:
        return False
    _malloc_pinned = True
    glibc = _glibc()
    if glibc is not None:
        glibc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        glibc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    return True


def _status_kib(field):
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_in_child(fn):
    """Runs fn in a forked child (single-threaded) and returns its peak RSS above its start, in bytes."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(read_end)
            # An OpenMP thread pool does not survive fork: the child computes on one thread.
            torch.set_num_threads(1)
            start = _status_kib("VmRSS")
            fn()
            os.write(write_end, str((_status_kib("VmHWM") - start) * 1024).encode())
            status = 0
        except BaseException:  # the parent raises it, with this traceback
            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        reply = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not reply:
        raise RuntimeError("the measured call failed in the forked child" + (f":\n{reply}" if reply else ""))
    return int(reply)


class PeakMemory:
    """Peak memory, in bytes above what was in use at entry, of the block it wraps (`.bytes` after exit).

        with PeakMemory("cpu") as peak:
            work()
        peak.bytes

    On a CUDA device it reads the caching allocator's statistics (synchronizing at both ends); on the
    CPU the process's peak resident set size, which needs /proc/self/clear_refs (`supported`)."""

    def __init__(self, device="cpu"):
        self.device = _checked_device(device)
        self.bytes = None

    @staticmethod
    def supported(device: Union[str, torch.device] = "cpu") -> bool:
        """Whether the peak can be measured in this process on `device`."""
        device = _checked_device(device)
        return device.type == "cuda" or _reset_peak_rss()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            if _pin_malloc_thresholds():
                _give_back_free_heap()
            if not _reset_peak_rss():
                raise OSError("/proc/self/clear_refs cannot be written: use measure_peak_memory (forked child)")
            self._start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.bytes = max(0, _status_kib("VmHWM") * 1024 - self._start)
        return False


def _checked_device(device) -> torch.device:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"peak memory is measured on cpu and cuda devices, got {device}")
    return device


def measure_peak_memory(fn: Callable[[], Any], device: Union[str, torch.device] = "cpu") -> int:
    """Peak memory, in bytes above what was in use before, while `fn()` runs.

    device: "cpu" (peak resident set size of the process, see the module docstring; Linux only) or a
    CUDA device (peak of the caching allocator's allocated bytes). fn's return value is dropped, so
    whatever it allocates and does not keep counts only while it runs. The CPU figure covers every
    allocation of the process, including other threads'.
    """
    if torch.device(device).type == "cpu":
        _pin_malloc_thresholds()
        _give_back_free_heap()
    if not PeakMemory.supported(device):
        return _cpu_peak_in_child(fn)
    with PeakMemory(device) as peak:
        fn()
    return peak.bytes
