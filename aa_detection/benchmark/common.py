"""What every benchmark shares: the device check, the timing loop, the environment and the sentence
comparing two timed figures with their spread."""
import contextlib
import datetime
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Union

import torch

from ..errors import ConfigError
from ..utils.memory import PeakMemory, measure_peak_memory

__all__ = ["AMP_DTYPES", "Runs", "autocast", "compare_times", "environment", "fmt_bytes",
           "resolve_device", "run_in_turns"]

GiB = 1 << 30
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device of a --device flag; a ConfigError where this machine cannot run it."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device name ({e}); use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: the benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                          "torch.cuda.is_available() is False); run on a machine with a GPU or use --device cpu")
    return device


def autocast(device: torch.device, amp: Optional[str]) -> ContextManager:
    """torch.autocast to the --amp dtype ("bf16" or "fp16") on the device, or nothing for amp None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runs:
    """The timed calls of one step: wall and CPU seconds of each, the peak memory over the calls (bytes
    above what was in use before each call) and the first call's return value."""

    seconds: List[float] = field(default_factory=list)
    cpu_seconds: List[float] = field(default_factory=list)
    peak_bytes: int = 0
    result: Any = None
    on_cpu: bool = True

    def summary(self) -> Dict[str, Any]:
        """{"median", "min", "max", "runs", "cores_used"}: seconds of the calls; cores_used is the CPU
        seconds per wall second over them (the thread count when the cores were this process's alone,
        lower when other processes took them; None on a GPU)."""
        return {
            "median": statistics.median(self.seconds),
            "min": min(self.seconds),
            "max": max(self.seconds),
            "runs": list(self.seconds),
            "cores_used": sum(self.cpu_seconds) / max(sum(self.seconds), 1e-9) if self.on_cpu else None,
        }


def run_in_turns(steps: Mapping[str, Callable[[], Any]], device: Union[str, torch.device] = "cpu", repeats: int = 3,
                 warmup: int = 0, long_call: float = math.inf) -> Dict[str, Runs]:
    """Times the steps in turns (warm-up calls first, then `repeats` rounds of one call of each); a step
    whose first timed call took longer than `long_call` seconds is not called again. Each timed call is
    bracketed by torch.cuda.synchronize on a GPU, and its peak memory is measured around it
    (utils.memory.PeakMemory); where this process cannot measure its own CPU peak, each step runs once
    more, untimed, in a forked child for it."""
    device = torch.device(device)
    for step in steps.values():
        for _ in range(warmup):
            step()
    in_process = PeakMemory.supported(device)
    runs = {name: Runs(on_cpu=device.type == "cpu") for name in steps}
    for round_index in range(repeats):
        for name, step in steps.items():
            entry = runs[name]
            if entry.seconds and entry.seconds[0] > long_call:
                continue
            synchronize(device)
            with PeakMemory(device) if in_process else contextlib.nullcontext() as peak:
                cpu_start, start = time.process_time(), time.perf_counter()
                result = step()
                synchronize(device)
                entry.seconds.append(time.perf_counter() - start)
                entry.cpu_seconds.append(time.process_time() - cpu_start)
            if round_index == 0:
                entry.result = result
            if peak is not None:
                entry.peak_bytes = max(entry.peak_bytes, peak.bytes)
    if not in_process:
        for name, step in steps.items():
            runs[name].peak_bytes = measure_peak_memory(step, device)
    return runs


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def environment(device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """{field: value} naming the machine, library versions, threads and date of a measurement."""
    device = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["tf32 matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def compare_times(label_a: str, a: Mapping, label_b: str, b: Mapping) -> str:
    """One sentence on two timed figures (summaries with median, min, max, runs): their ratio, and whether
    the difference stands out of the run-to-run spread (the min-max ranges do not overlap)."""
    ratio = a["median"] / b["median"]
    medians = f"medians {a['median']:.3g} s and {b['median']:.3g} s"
    single = [label for label, t in ((label_a, a), (label_b, b)) if len(t["runs"]) < 2]
    if single:
        return (f"{label_a} / {label_b}: {ratio:.2f}x ({medians}); one run of {' and '.join(single)}, so no "
                "spread was measured to compare the difference with.")
    ranges = f"runs {a['min']:.3g}-{a['max']:.3g} s and {b['min']:.3g}-{b['max']:.3g} s"
    if a["max"] < b["min"] or b["max"] < a["min"]:
        return f"{label_a} / {label_b}: {ratio:.2f}x ({medians}; {ranges} do not overlap: the difference is measured)."
    return (f"{label_a} / {label_b}: {ratio:.2f}x ({medians}), within the run-to-run spread ({ranges} overlap): "
            "the runs cannot tell these two apart.")
