"""The relative attention paths on the feature maps of an 800x1333 detection input, and their floor.

For each map (res5 25x42, res4 50x84, res3 100x167; batch 2; AA-ResNet-50 head widths with Nh=8,
kappa=0.2, upsilon=0.1) the paths run in turns in one process (`common.run_in_turns`): median time and
peak memory of the forward pass (no autograd) and of forward+backward (training), their ratios to the
naive path, and the largest difference of the output and of the gradients from the naive path. Where
the naive path's dense logits would not fit, it is skipped, its memory estimated from the peak/logits
ratio measured on the largest map it ran on, and the other paths have no reference there.

Which paths run (`paths_for`): "kernel" (the compiled CPU kernel, timed as the layer calls it, on the qkv
convolution's output) only on the CPU where it is built; "flex" only on CUDA; "naive" only where its
dense (B, Nh, HW, HW) logits fit the memory budget; "fused" everywhere. With --kernel-isas the kernel
runs once per instruction set asked, as "kernel[ISA]" (`with_kernel_isas`).

The floor counts the attention's unavoidable work at the real head widths and converts it to time with
the device's measured matmul (FLOP/s, torch.mm) and exp (elements/s) rates, in the compute dtype:
  q.k         2 B Nh (HW)^2 dkh FLOPs
  relative    2 B Nh HW (H+W) dkh FLOPs (q.r^H, q.r^W) + 2 B Nh (HW)^2 adds (both terms, each logit)
  p.v         2 B Nh (HW)^2 dvh FLOPs
  softmax     B Nh (HW)^2 exps
Backward adds the gradient matmuls: 2 B Nh (HW)^2 (2 dkh + 2 dvh) FLOPs (dq, dk, dp, dv),
2 B Nh (HW)^2 adds (gradients of the relative logits) and 4 B Nh HW (H+W) dkh FLOPs (their einsums).
Exps are counted once for forward+backward, so a path that recomputes them (as every path that does
not store (HW)^2 probabilities must) pays them twice. Adds count at the matmul rate. On the CPU the exp
rate is the faster of torch.exp and the kernel's own exp, and "cores used" is the process's CPU seconds
per wall second during a path's calls (the floor assumes every thread had a core). On CUDA torch.exp
over a large tensor is bound by memory bandwidth (a read and a write per exp), while an attention kernel
computes its exps in registers: the exp rate there is the faster of torch.exp and a compiled kernel
applying 32 chained exps to each element it loads.

With --compile-times, FlexAttention's compilation is timed first (`flex_compile_times`): on each map in
turn, the first call against the calls after it, for a first size (static graphs) and after a size change
(graphs recompiled with dynamic sizes).
"""
import argparse
import contextlib
from functools import lru_cache
import json
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layers import AttentionSpec, attention_depths
from ..layers import kernel, naive, relative_attention
from ..layers.relative_attention import relative_attention_2d, relative_attention_qkv
from ..layers.relative_logits import split_heads
from ..errors import ConfigError
from ..safe_io import atomic_write
from ..utils.table import format_table
from .common import AMP_DTYPES, GiB, autocast, environment, fmt_bytes, resolve_device, run_in_turns

__all__ = ["PATHS", "SIZES", "add_arguments", "compile_table", "flex_compile_times", "floor_seconds", "floor_work",
           "main", "measure_rates", "paths_for", "table_rows", "with_kernel_isas"]

# name: (H, W, Fout) of the 800x1333 input's stage outputs where AA-ResNet-50 places attention.
SIZES = {"res5": (25, 42, 512), "res4": (50, 84, 256), "res3": (100, 167, 128)}
PATHS = tuple(relative_attention.PATHS)
MODES = ("forward", "train")
SWEEP_SIZES = ((4, 4), (8, 8), (12, 16), (16, 24), (20, 32), (24, 40), (28, 44), (32, 48))
# Exps per element of the GPU's exp-rate kernel: enough to make it bound by exp throughput, not memory.
EXP_CHAIN = 32


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of tools/benchmark_attention.py."""
    p = parser
    p.add_argument("--sizes", default="res5,res4,res3", help="comma list of " + ",".join(SIZES))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=sorted(AMP_DTYPES),
                   help="run the paths under torch.autocast to this dtype (bf16 when given alone)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=AttentionSpec.num_heads)
    p.add_argument("--kappa", type=float, default=AttentionSpec.kappa)
    p.add_argument("--upsilon", type=float, default=AttentionSpec.upsilon)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (median); calls longer "
                   "than --long-call seconds run once")
    p.add_argument("--long-call", type=float, default=30.0)
    p.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip the naive path above this estimated peak (default: half of the free memory)")
    p.add_argument("--no-train", action="store_true", help="forward only")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma list of " + ",".join(PATHS) + " (each runs only where it can, see paths_for)")
    p.add_argument("--kernel-isas", default=None,
                   help="comma list of the kernel's instruction sets to time side by side, rows kernel[ISA] "
                        "(\"all\": every one this CPU runs); default: the one in use")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--sweep", action="store_true",
                   help="instead, time the paths on small maps (res5 widths) to place NAIVE_MAX_PIXELS")
    p.add_argument("--compile-times", nargs="?", const="res5,res4,res3", default=None, metavar="MAPS",
                   help="first time FlexAttention's compilation on these maps in this order (names, or HxW at the "
                        "res5 widths; res5,res4,res3 when given alone), before anything else compiles it")
    return p


def free_memory_bytes(device: torch.device) -> float:
    """Free memory of the device: the GPU's free bytes, or the CPU's MemAvailable (16 GiB if unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 16.0 * GiB


def paths_for(device: torch.device, wanted: Sequence[str], naive_estimate: float, budget: float) -> List[str]:
    """The wanted paths that run on the device, in PATHS order: kernel on the CPU where it is built, flex on
    CUDA, naive where its estimated peak (bytes) is within the budget, fused everywhere."""
    runs_here = {
        "naive": naive_estimate <= budget,
        "fused": True,
        "kernel": device.type == "cpu" and kernel.kernel_available(),
        "flex": device.type == "cuda",
    }
    return [p for p in PATHS if p in wanted and runs_here[p]]


def with_kernel_isas(paths: Sequence[str], isas: Optional[Sequence[str]]) -> List[str]:
    """paths with "kernel" replaced by one "kernel[ISA]" per instruction set in isas (None: unchanged)."""
    if not isas:
        return list(paths)
    return [name for p in paths for name in ([f"kernel[{isa}]" for isa in isas] if p == "kernel" else [p])]


def make_inputs(B: int, Nh: int, H: int, W: int, dkh: int, dvh: int, device: torch.device,
                amp: Optional[str] = None, seed: int = 0) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """((q, k (B, Nh, H, W, dkh), v (B, Nh, H, W, dvh), rel_h (2H-1, dkh), rel_w (2W-1, dkh)), grad_out).

    Under --amp, q, k, v and grad_out are in its dtype, as the qkv convolution gives them under autocast;
    the tables, parameters, stay fp32."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, Nh, H, W, dkh, generator=g) for _ in range(2))
    v = torch.randn(B, Nh, H, W, dvh, generator=g)
    rel_h = torch.randn(2 * H - 1, dkh, generator=g) * dkh**-0.5
    rel_w = torch.randn(2 * W - 1, dkh, generator=g) * dkh**-0.5
    grad_out = torch.randn(B, Nh, H, W, dvh, generator=g)
    dtype = AMP_DTYPES[amp] if amp else torch.float32
    q, k, v, grad_out = (t.to(device, dtype) for t in (q, k, v, grad_out))
    return (q, k, v, rel_h.to(device), rel_w.to(device)), grad_out


def _warmup_calls(device: torch.device) -> int:
    """Untimed calls of each path before a new map size's timed ones: one on CUDA, where FlexAttention
    compiles for new input sizes, none on the CPU."""
    return 1 if device.type == "cuda" else 0


def to_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Nh, H, W, d) q, k, v -> the qkv convolution's layout (B, 2 dk + dv, H, W)."""
    B, Nh, H, W, _ = q.shape
    return torch.cat([t.permute(0, 1, 4, 2, 3).reshape(B, -1, H, W) for t in (q, k, v)], 1)


def attention_step(inputs: Sequence[torch.Tensor], grad_out: torch.Tensor, impl: str, train: bool,
                   device: torch.device, amp: Optional[str] = None) -> Tuple[Callable, Callable]:
    """A callable running one call of the path; it returns (out, gradients or None) in the
    (B, Nh, H, W, d) layout. The kernel path is called as the layer calls it, on the qkv layout
    (B, 2 dk + dv, H, W) through `relative_attention_qkv`; the mapping back is outside the call.
    "kernel[ISA]" is the kernel compiled for that instruction set."""
    isa = impl[len("kernel["):-1] if impl.startswith("kernel[") else None
    impl = "kernel" if isa else impl
    q, k, v, rel_h, rel_w = inputs
    B, Nh, H, W, dkh = q.shape
    dvh = v.shape[-1]
    qkv_layout = impl == "kernel"
    if qkv_layout:
        tensors = [to_qkv(q, k, v), rel_h, rel_w]
        grad = grad_out.permute(0, 1, 4, 2, 3).reshape(B, Nh * dvh, H, W).contiguous()
    else:
        tensors, grad = list(inputs), grad_out

    def attend(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        with autocast(device, amp), (kernel.using_kernel_isa(isa) if isa else contextlib.nullcontext()):
            if qkv_layout:
                return relative_attention_qkv(leaves[0], Nh, Nh * dkh, Nh * dvh, leaves[1], leaves[2], impl=impl)
            return relative_attention_2d(*leaves, impl=impl)

    def step() -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
        leaves = [t.detach().requires_grad_(train) for t in tensors]
        if train:
            out = attend(leaves)
            grads = torch.autograd.grad(out, leaves, grad)
        else:
            with torch.inference_mode():
                out = attend(leaves)
            grads = None
        return out.detach(), grads

    def in_common_layout(result: Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]
                         ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
        out, grads = result
        if qkv_layout:
            out = out.reshape(B, Nh, dvh, H, W).permute(0, 1, 3, 4, 2)
            if grads is not None:
                dq, dk, dv = split_heads(grads[0], Nh, Nh * dkh, Nh * dvh)
                grads = (dq, dk, dv, grads[1], grads[2])
        return out, grads

    return step, in_common_layout


def measure_rates(device: torch.device, dtypes: Sequence[torch.dtype], repeats: int = 10) -> Dict[str, Dict]:
    """{dtype name: {"matmul_flops": FLOP/s of torch.mm, "exp_rates": {name: exps/s}, "exp_per_s": fastest}}.

    On the CPU, for the current thread count N: the larger of the best call at N threads and N times the
    best call at one thread (on a shared CPU, calls at N threads wait for the slowest thread), with the
    kernel's own exp beside torch.exp where it is built. On CUDA, the best of synchronized calls, with a
    compiled kernel of EXP_CHAIN chained exps per element beside torch.exp. Each size gets `repeats` timed
    calls or half a second, whichever ends first."""
    if device.type == "cuda":
        return {_dtype_name(dt): _best_rates(device, dt, repeats) for dt in dtypes}
    threads = torch.get_num_threads()
    rates = {}
    for dt in dtypes:
        try:
            torch.set_num_threads(1)
            one = _best_rates(device, dt, repeats)
        finally:
            torch.set_num_threads(threads)
        many = _best_rates(device, dt, repeats)
        exps = {k: max(many["exp_rates"][k], threads * one["exp_rates"][k]) for k in many["exp_rates"]}
        rates[_dtype_name(dt)] = {
            "matmul_flops": max(many["matmul_flops"], threads * one["matmul_flops"]),
            "exp_rates": exps, "exp_per_s": max(exps.values())}
    return rates


def _best_time(fn, repeats, device, prepare=lambda: None, budget_s=0.5):
    """Best seconds of up to `repeats` calls of fn(prepare()) after one warm-up call, stopping once the
    calls have taken budget_s."""
    best, spent = math.inf, 0.0
    for index in range(repeats + 1):
        arg = prepare()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(arg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if index > 0:
            best, spent = min(best, seconds), spent + seconds
            if spent > budget_s:
                break
    return best


def _best_rates(device, dtype, repeats):
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    mm = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        mm = max(mm, 2 * n**3 / _best_time(lambda _: torch.mm(a, b), repeats, device))
    exps = {"torch.exp": (lambda x: torch.exp(x, out=x), 1)}  # name: (call, exps per element)
    if device.type == "cpu" and dtype == torch.float32 and kernel.kernel_available():
        exps["kernel exp"] = (kernel._C.fast_exp_, 1)
    if device.type == "cuda":  # torch.exp there is bound by memory, an attention kernel's exps are not
        exps[f"{EXP_CHAIN} chained exps"] = (_compiled_exp_chain(), EXP_CHAIN)
    lengths = (1 << 24, 1 << 26) if device.type == "cuda" else (1 << 18, 1 << 20, 1 << 22)
    ex = {}
    for name, (exp, per_element) in exps.items():
        ex[name] = 0.0
        for n in lengths:
            x = (-torch.rand(n, device=device) * 20).to(dtype)  # logits minus their max
            reps = max(repeats, (1 << 25) // n)
            ex[name] = max(ex[name], per_element * n / _best_time(exp, reps, device, prepare=x.clone))
    return {"matmul_flops": mm, "exp_rates": ex, "exp_per_s": max(ex.values())}


@lru_cache(maxsize=1)
def _compiled_exp_chain() -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> exp(-exp(-...exp(-x))), EXP_CHAIN exps of each element in one compiled kernel (values stay finite)."""
    def chain(x: torch.Tensor) -> torch.Tensor:
        for _ in range(EXP_CHAIN):
            x = torch.exp(-x)
        return x
    return torch.compile(chain)


def compute_dtype(amp: Optional[str]) -> str:
    """Name of the dtype the paths compute in: float32, or the --amp dtype (its rates give the floor)."""
    return _dtype_name(AMP_DTYPES[amp]) if amp else "float32"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def floor_work(B: int, Nh: int, H: int, W: int, dkh: int, dvh: int) -> Dict[str, tuple]:
    """Unavoidable (FLOPs, exps) of the forward pass and of forward+backward; see the module docstring."""
    HW = H * W
    pairs = B * Nh * HW * HW
    rel_proj = 2 * B * Nh * HW * (H + W) * dkh
    fwd_flops = 2 * pairs * dkh + rel_proj + 2 * pairs + 2 * pairs * dvh
    bwd_flops = 2 * pairs * (2 * dkh + 2 * dvh) + 2 * pairs + 2 * rel_proj
    return {"forward": (fwd_flops, pairs), "train": (fwd_flops + bwd_flops, pairs)}


def floor_seconds(flops: float, exps: float, rates: Dict, exp_name: Optional[str] = None) -> float:
    """Seconds of the work at one dtype's rates (the fastest exp, or the named one)."""
    exp_rate = rates["exp_per_s"] if exp_name is None else rates["exp_rates"][exp_name]
    return flops / rates["matmul_flops"] + exps / exp_rate


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def bench_size(name: str, args: argparse.Namespace, device: torch.device, rates: Dict[str, Dict],
               factors: Dict[str, float]) -> Dict:
    """Times and peaks of every path on one map; factors: naive peak / dense logits bytes per mode."""
    H, W, fout = SIZES[name]
    dk, dv = attention_depths(fout, args.heads, args.kappa, args.upsilon)
    B, Nh, dkh, dvh = args.batch, args.heads, dk // args.heads, dv // args.heads
    inputs, grad_out = make_inputs(B, Nh, H, W, dkh, dvh, device, args.amp)
    logits_bytes = B * Nh * (H * W) ** 2 * 4
    modes = MODES[:1] if args.no_train else MODES
    budget = (args.naive_max_gib * GiB if args.naive_max_gib is not None else free_memory_bytes(device) / 2)
    estimates = {m: factors[m] * logits_bytes for m in modes}
    naive_estimate = max(estimates.values())  # naive is the reference of every mode or of none
    paths = with_kernel_isas(paths_for(device, args.paths.split(","), naive_estimate, budget), args.kernel_isas)
    reference = "naive" if "naive" in paths else None
    row = {"size": name, "H": H, "W": W, "B": B, "Nh": Nh, "dkh": dkh, "dvh": dvh, "reference": reference,
           "threads": torch.get_num_threads(), "naive_logits_bytes": logits_bytes, "paths": {p: {} for p in paths},
           "skipped": {}, "floor": {}}
    if "naive" in args.paths.split(",") and reference is None:
        row["skipped"]["naive"] = {"estimated_peak_bytes": estimates, "budget_bytes": budget}
    work = floor_work(B, Nh, H, W, dkh, dvh)
    dtype_rates = rates[compute_dtype(args.amp)]
    for mode in modes:
        flops, exps = work[mode]
        row["floor"][mode] = {"flops": flops, "exps": exps, "seconds": floor_seconds(flops, exps, dtype_rates)}
        if len(dtype_rates["exp_rates"]) > 1:
            row["floor"][mode]["seconds_torch_exp"] = floor_seconds(flops, exps, dtype_rates, "torch.exp")
        steps = {p: attention_step(inputs, grad_out, p, mode == "train", device, args.amp) for p in paths}
        runs = run_in_turns({p: s[0] for p, s in steps.items()}, device, args.repeats, _warmup_calls(device),
                            long_call=args.long_call)
        results = {p: steps[p][1](runs[p].result) for p in paths}
        for p in paths:
            row["paths"][p][mode] = _path_figures(runs[p], results[p], results.get(reference), row["floor"][mode],
                                                  p == reference)
    q, _, v = inputs[:3]
    row["auto"] = relative_attention.choose_impl(q.device, *q.shape[2:], v.shape[-1], q.dtype)
    return row


def _path_figures(runs, result, reference, floor, is_reference) -> Dict:
    time = runs.summary()
    figures = {"time": time, "peak_bytes": runs.peak_bytes,
               "floor_multiple": time["median"] / floor["seconds"],
               "best_floor_multiple": time["min"] / floor["seconds"]}
    if "seconds_torch_exp" in floor:
        figures["floor_multiple_torch_exp"] = time["median"] / floor["seconds_torch_exp"]
    if reference is not None and not is_reference:  # a difference needs an independent reference
        figures["max_abs_diff_out"] = _max_diff(result[0], reference[0])
        if result[1] is not None:
            figures["max_abs_diff_grad"] = max(_max_diff(a, b) for a, b in zip(result[1], reference[1]))
    return figures


def table_rows(rows: List[Dict], mode: str) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of the table of one mode; difference columns are empty ("-") for the reference
    itself and where no reference ran."""
    with_cores = any(r["paths"][p][mode]["time"].get("cores_used") is not None for r in rows for p in r["paths"])
    with_torch_exp = any("seconds_torch_exp" in r["floor"][mode] for r in rows)
    header = ["map", "HW", "dkh/dvh", "path", "time (s)", "best (s)", "peak mem", "naive/path time",
              "naive/path mem", "out: max abs diff to naive", "grads: max abs diff to naive", "floor (s)",
              "time/floor", "best/floor"]
    if with_torch_exp:
        header.append("time/floor at torch.exp rate")
    if with_cores:
        header += ["cores used", "time/floor at the cores used"]
    table = []
    for row in rows:
        naive = row["paths"].get("naive", {}).get(mode)
        floor = row["floor"][mode]["seconds"]
        head = (f"{row['size']} {row['H']}x{row['W']}", row["H"] * row["W"], f"{row['dkh']}/{row['dvh']}")
        skipped = row["skipped"].get("naive")
        if skipped:
            est = skipped["estimated_peak_bytes"][mode]
            table.append(head + ("naive", "skipped", "-", f"est. {fmt_bytes(est)}") + ("-",) * 4
                         + (f"{floor:.3f}",) + ("-",) * (len(header) - 12))
        for p, figures in row["paths"].items():
            r = figures[mode]
            t, peak = r["time"], r["peak_bytes"]
            t_ratio = f"{naive['time']['median'] / t['median']:.2f}" if naive else "-"
            m_ratio = f"{naive['peak_bytes'] / max(peak, 1):.1f}" if naive else "-"
            if skipped:
                m_ratio = f"est. {skipped['estimated_peak_bytes'][mode] / max(peak, 1):.0f}"
            diffs = tuple(f"{r[k]:.1e}" if k in r else "-" for k in ("max_abs_diff_out", "max_abs_diff_grad"))
            cells = head + (p, f"{t['median']:.3f}", f"{t['min']:.3f}", fmt_bytes(peak), t_ratio, m_ratio) + diffs
            cells += (f"{floor:.3f}", f"{r['floor_multiple']:.1f}", f"{r['best_floor_multiple']:.1f}")
            if with_torch_exp:
                cells += (f"{r['floor_multiple_torch_exp']:.1f}" if "floor_multiple_torch_exp" in r else "-",)
            if with_cores:
                cores = t.get("cores_used")
                cells += ("-", "-") if cores is None else (
                    f"{cores:.2f}", f"{r['floor_multiple'] * cores / row['threads']:.1f}")
            table.append(cells)
        table.append(head + (f"auto -> {row['auto']}",) + ("",) * (len(header) - 4))
    return header, table


def rates_line(meta: Dict) -> str:
    """The measured rates of a run, in words."""
    parts = []
    for dtype, r in meta["rates"].items():
        exps = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in r["exp_rates"].items())
        parts.append(f"{dtype}: matmul {r['matmul_flops'] / 1e9:.1f} GFLOP/s, exp {r['exp_per_s'] / 1e9:.2f} Gexp/s"
                     + (f" (best of: {exps} Gexp/s)" if len(r["exp_rates"]) > 1 else ""))
    return "; ".join(parts) + f"; floor at {meta['compute_dtype']}"


def _map_size(spec: str) -> Tuple[int, int, int]:
    """(H, W, Fout) of a map named in SIZES, or of "HxW" at the res5 widths."""
    if spec in SIZES:
        return SIZES[spec]
    try:
        H, W = (int(n) for n in spec.lower().split("x"))
    except ValueError:
        raise ConfigError(f"map {spec!r}: use one of {', '.join(SIZES)} or HxW, e.g. 25x42") from None
    return H, W, SIZES["res5"][2]


def flex_compile_times(device: torch.device, maps: Sequence[str], args: argparse.Namespace) -> List[Dict]:
    """FlexAttention's compilation cost: on each map in turn and each mode (forward, then train where it can
    train: CUDA), the first call's seconds less the median of the `args.repeats` calls after it. On the first
    map torch.compile builds static graphs; a later size recompiles them with dynamic sizes, which a third
    size may reuse. Meaningful in a process where FlexAttention has not been compiled yet (off CUDA it runs
    uncompiled, on maps of at most NAIVE_MAX_PIXELS)."""
    modes = MODES[:1] if args.no_train or device.type != "cuda" else MODES
    rows = []
    for spec in maps:
        H, W, fout = _map_size(spec)
        Nh = args.heads
        dk, dv = attention_depths(fout, Nh, args.kappa, args.upsilon)
        inputs, grad_out = make_inputs(args.batch, Nh, H, W, dk // Nh, dv // Nh, device, args.amp)
        for mode in modes:
            step = attention_step(inputs, grad_out, "flex", mode == "train", device, args.amp)[0]
            first = run_in_turns({"flex": step}, device, repeats=1)["flex"].seconds[0]
            later = run_in_turns({"flex": step}, device, repeats=args.repeats)["flex"].summary()["median"]
            rows.append({"map": spec, "H": H, "W": W, "mode": mode, "first_call_s": first, "later_call_s": later,
                         "compile_s": first - later})
    return rows


def compile_table(rows: List[Dict]) -> str:
    """flex_compile_times' rows as a table."""
    return format_table(("map", "mode", "first call (s)", "later calls (s, median)", "compile (s)"), [
        (f"{r['map']} {r['H']}x{r['W']}" if r["map"] in SIZES else r["map"], r["mode"], f"{r['first_call_s']:.2f}",
         f"{r['later_call_s']:.4f}", f"{r['compile_s']:.2f}") for r in rows])


def warm_up(device: torch.device, amp: Optional[str]) -> None:
    """One call of each path and mode on a small map (thread pools, caches, first-call costs)."""
    inputs, grad_out = make_inputs(2, 8, 12, 20, 13, 6, device, amp)
    for train in (False, True):
        steps = {p: attention_step(inputs, grad_out, p, train, device, amp)[0]
                 for p in paths_for(device, PATHS, 0, 1)}
        run_in_turns(steps, device, repeats=1)


def sweep(args: argparse.Namespace, device: torch.device) -> Dict:
    """Naive against the other paths on small maps at the res5 widths: where "auto" should switch."""
    B, Nh = args.batch, args.heads
    dk, dv = attention_depths(SIZES["res5"][2], Nh, args.kappa, args.upsilon)
    paths = paths_for(device, args.paths.split(","), 0, 1)
    rows, table = [], []
    for H, W in SWEEP_SIZES:
        inputs, grad_out = make_inputs(B, Nh, H, W, dk // Nh, dv // Nh, device, args.amp)
        for mode in MODES:
            steps = {p: attention_step(inputs, grad_out, p, mode == "train", device, args.amp)[0] for p in paths}
            runs = run_in_turns(steps, device, max(args.repeats, 5), _warmup_calls(device))
            ms = {p: runs[p].summary()["median"] * 1e3 for p in paths}
            rows.append({"H": H, "W": W, "mode": mode, "ms": ms})
            table.append((f"{H}x{W}", H * W, mode, *(f"{ms[p]:.1f}" for p in paths), min(ms, key=ms.get)))
    print(format_table(("HxW", "HW", "mode", *(f"{p} (ms)" for p in paths), "fastest"), table))
    return {"meta": dict(environment(device), device=str(device)), "sweep": rows}


def main(args: argparse.Namespace) -> Dict:
    """Runs the benchmark of the parsed flags, prints its tables and writes --json; returns the results.
    `args` is left as it is; the thread count is restored afterwards."""
    device = resolve_device(args.device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for flag, given, known in (("--sizes", sizes, SIZES), ("--paths", args.paths.split(","), PATHS)):
        if set(given) - set(known):
            raise ConfigError(f"{flag}: unknown {sorted(set(given) - set(known))}; choose from {', '.join(known)}")
    args = argparse.Namespace(**{**vars(args), "kernel_isas": _kernel_isas_flag(args.kernel_isas)})
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        compile_rows = flex_compile_times(device, args.compile_times.split(","), args) if args.compile_times else []
        warm_up(device, args.amp)
        if args.sweep:
            results = sweep(args, device)
        else:
            results = run(args, device, sizes, {"flex_compile": compile_rows} if compile_rows else None)
            print(render(results))
    finally:
        torch.set_num_threads(threads)
    if args.json:
        write_results(args.json, results)
    return results


def _kernel_isas_flag(value: Optional[str]) -> Optional[List[str]]:
    """--kernel-isas as a list of instruction sets ("all": every one this CPU runs); None when not given."""
    if not value:
        return None
    isas = kernel.kernel_isas()
    asked = isas if value == "all" else value.split(",")
    if set(asked) - set(isas):
        raise ConfigError(f"--kernel-isas: {sorted(set(asked) - set(isas))} do not run here; "
                          f"this CPU runs {', '.join(isas) or 'no kernel (aa_detection._C is not built)'}")
    return asked


def run(args: argparse.Namespace, device: torch.device, sizes: Sequence[str], extra: Optional[Dict] = None) -> Dict:
    """{"meta": environment, rates and flags, "rows": one bench_size row per map, **extra}, smallest map first.
    --json is written after each map, so a run stopped midway keeps the maps it finished."""
    modes = MODES[:1] if args.no_train else MODES
    dtypes = [torch.float32] + ([AMP_DTYPES[args.amp]] if args.amp else [])
    if device.type == "cuda":  # the GPU's rates in both precisions, whatever this run computes in
        dtypes = sorted(set(dtypes) | {torch.float32, torch.bfloat16}, key=str)
    rates = measure_rates(device, dtypes)
    meta = dict(
        environment(device),
        device=str(device),
        amp=args.amp,
        compute_dtype=compute_dtype(args.amp),
        kernel_isa=kernel._C.kernel_isa() if kernel.kernel_available() else None,
        naive_max_pixels=naive.NAIVE_MAX_PIXELS,
        rates=rates,
        args=vars(args),
    )
    results = {"meta": meta, "rows": [], **(extra or {})}
    factors = {m: 4.0 for m in modes}  # naive peak / dense-logits bytes, measured once naive has run
    for name in sorted(sizes, key=lambda s: SIZES[s][0] * SIZES[s][1]):
        row = bench_size(name, args, device, rates, factors)
        if "naive" in row["paths"]:
            factors = {m: row["paths"]["naive"][m]["peak_bytes"] / row["naive_logits_bytes"] for m in modes}
        results["rows"].append(row)
        if args.json:
            write_results(args.json, results)
        print(f"{name} done", flush=True)
    return results


def write_results(path: str, results: Dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=1)


def render(results: Dict) -> str:
    """The rates line and one table per mode of a run's results."""
    lines = [f"device {results['meta']['device']}; " + rates_line(results["meta"])]
    for mode in MODES:
        if all(mode in r["floor"] for r in results["rows"]):
            lines += ["", f"### {mode}", "", format_table(*table_rows(results["rows"], mode))]
    if results.get("flex_compile"):
        lines += ["", "### FlexAttention compile time", "", compile_table(results["flex_compile"])]
    return "\n".join(lines)
