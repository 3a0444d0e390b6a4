"""Peak memory of a call, on the GPU (allocator statistics) or the CPU (resident set size).

On the CPU, Linux keeps the peak resident set size of a process (VmHWM in /proc/self/status);
writing "5" to /proc/self/clear_refs resets it to the current size, so the peak of a call is VmHWM
after it minus VmRSS before it. Where clear_refs cannot be written, the call runs in a forked child,
whose peak starts at the parent's current size (the child runs on one thread). Both count pages the call newly touches, so the
measurement is only as good as freed memory goes back to the system: glibc serves allocations from
its heap below a threshold that grows as large blocks are freed; `measure_peak_memory` pins that
threshold at 128 KiB (mallopt) so that tensor buffers are mapped and unmapped one by one.
"""
import ctypes
import os
import re

import torch

__all__ = ["measure_peak_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_pinned = False


def _pin_malloc_thresholds():
    """Make glibc map every block above 128 KiB on its own and return it on free (once per process)."""
    global _malloc_pinned
    if _malloc_pinned:
        return
    _malloc_pinned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: measure as is
        pass


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
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        reply = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not reply:
        raise RuntimeError("the measured call failed in the forked child")
    return int(reply)


def _cpu_peak(fn):
    _pin_malloc_thresholds()
    if not _reset_peak_rss():
        return _cpu_peak_in_child(fn)
    start = _status_kib("VmRSS")
    fn()
    return max(0, (_status_kib("VmHWM") - start) * 1024)


def _cuda_peak(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def measure_peak_memory(fn, device="cpu"):
    """Peak memory, in bytes above what was in use before, while `fn()` runs.

    device: "cpu" (peak resident set size of the process, see the module docstring; Linux only) or a
    CUDA device (peak of the caching allocator's allocated bytes). fn's return value is dropped, so
    whatever it allocates and does not keep counts only while it runs. The CPU figure covers every
    allocation of the process, including other threads'.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type != "cpu":
        raise ValueError(f"measure_peak_memory supports cpu and cuda devices, got {device}")
    return _cpu_peak(fn)
