#!/usr/bin/env python
"""Benchmark of the relative attention paths on the feature maps of an 800x1333 detection input.

For each map (res5 25x42, res4 50x84, res3 100x167; batch 2; AA-ResNet-50 head widths with Nh=8,
kappa=0.2, upsilon=0.1) the paths run side by side in one process, alternating, and the table gives
the median time and the peak memory of the forward pass (no autograd) and of forward+backward
(training), their ratios to the naive path, and the largest difference of the output and of the
gradients from the reference (naive where it fits, else fused). Where the naive path's dense logits
would not fit, it is skipped and its memory estimated from the peak/logits ratio measured on the
largest map it ran on.

The floor section counts the attention's unavoidable work at the real head widths and converts it to
time with this machine's measured matmul (FLOP/s, torch.mm) and exp (elements/s: the faster of
torch.exp and the kernel's own exp, best call at the benchmark's thread count) rates:
  q.k         2 B Nh (HW)^2 dkh FLOPs
  relative    2 B Nh HW (H+W) dkh FLOPs (q.r^H, q.r^W) + 2 B Nh (HW)^2 adds (both terms, each logit)
  p.v         2 B Nh (HW)^2 dvh FLOPs
  softmax     B Nh (HW)^2 exps
Backward adds the gradient matmuls: 2 B Nh (HW)^2 (2 dkh + 2 dvh) FLOPs (dq, dk, dp, dv),
2 B Nh (HW)^2 adds (gradients of the relative logits) and 4 B Nh HW (H+W) dkh FLOPs (their einsums).
Exps are counted once for forward+backward, so a path that recomputes them (as every path that does
not store (HW)^2 probabilities must) pays them twice. Adds count at the matmul rate. "cores used" is the
process's CPU seconds per wall second during a path's calls: the thread count on an idle machine, lower
when other processes held the cores (the floor assumes they did not).

    python tools/benchmark_attention.py [--sizes res5,res4,res3] [--repeats 3] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aa_detection.layers import attention_depths, relative_attention_2d  # noqa: E402
from aa_detection.layers import relative_attention  # noqa: E402
from aa_detection.layers.relative_attention import relative_attention_qkv, split_heads  # noqa: E402
from aa_detection.utils.bench import environment, format_table  # noqa: E402
from aa_detection.utils.memory import measure_peak_memory  # noqa: E402

# name: (H, W, Fout) of the 800x1333 input's stage outputs where AA-ResNet-50 places attention.
SIZES = {"res5": (25, 42, 512), "res4": (50, 84, 256), "res3": (100, 167, 128)}
PATHS = ("naive", "fused", "kernel")
GiB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="res5,res4,res3", help="comma list of " + ",".join(SIZES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kappa", type=float, default=0.2)
    p.add_argument("--upsilon", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (median); calls longer "
                   "than --long-call seconds run once")
    p.add_argument("--long-call", type=float, default=30.0)
    p.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip the naive path above this estimated peak (default: half of MemAvailable)")
    p.add_argument("--no-train", action="store_true", help="forward only")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ",".join(PATHS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--sweep", action="store_true",
                   help="instead, time the paths on small maps (res5 widths) to place NAIVE_MAX_PIXELS")
    return p.parse_args(argv)


def mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 16.0


def make_inputs(B, Nh, H, W, dkh, dvh, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, Nh, H, W, dkh, generator=g) for _ in range(2))
    v = torch.randn(B, Nh, H, W, dvh, generator=g)
    rel_h = torch.randn(2 * H - 1, dkh, generator=g) * dkh**-0.5
    rel_w = torch.randn(2 * W - 1, dkh, generator=g) * dkh**-0.5
    grad_out = torch.randn(B, Nh, H, W, dvh, generator=g)
    return (q, k, v, rel_h, rel_w), grad_out


def to_qkv(q, k, v):
    """(B, Nh, H, W, d) q, k, v -> the qkv convolution's layout (B, 2 dk + dv, H, W)."""
    B, Nh, H, W, _ = q.shape
    return torch.cat([t.permute(0, 1, 4, 2, 3).reshape(B, -1, H, W) for t in (q, k, v)], 1)


def run_once(inputs, grad_out, impl, train):
    """One call; returns (seconds, peak bytes, output, gradients or None).

    The kernel path is timed as the layer calls it: on the qkv convolution's output (B, 2 dk + dv, H, W),
    through `relative_attention_qkv`; its output and gradients are mapped back to the (B, Nh, H, W, d)
    layout of the other paths for the comparisons (outside the timing)."""
    result = {}
    q, k, v, rel_h, rel_w = inputs
    B, Nh, H, W, dkh = q.shape
    dvh = v.shape[-1]
    qkv_layout = impl == "kernel"
    if qkv_layout:
        tensors = [to_qkv(q, k, v), rel_h, rel_w]
        grad = grad_out.permute(0, 1, 4, 2, 3).reshape(B, Nh * dvh, H, W).contiguous()
    else:
        tensors, grad = list(inputs), grad_out

    def attend(leaves):
        if qkv_layout:
            return relative_attention_qkv(leaves[0], Nh, Nh * dkh, Nh * dvh, leaves[1], leaves[2], impl=impl)
        return relative_attention_2d(*leaves, impl=impl)

    def call():
        leaves = [t.detach().requires_grad_(train) for t in tensors]
        c0, t0 = time.process_time(), time.perf_counter()
        if train:
            out = attend(leaves)
            grads = torch.autograd.grad(out, leaves, grad)
        else:
            with torch.inference_mode():
                out = attend(leaves)
            grads = None
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - c0
        result["out"], result["grads"] = out.detach(), grads

    peak = measure_peak_memory(call)
    out, grads = result["out"], result["grads"]
    if qkv_layout:
        out = out.reshape(B, Nh, dvh, H, W).permute(0, 1, 3, 4, 2)
        if grads is not None:
            dq, dk, dv = split_heads(grads[0], Nh, Nh * dkh, Nh * dvh)
            grads = (dq, dk, dv, grads[1], grads[2])
    return result["seconds"], peak, out, grads, result["cpu_seconds"]


def measure_rates(repeats=10):
    """This machine's fp32 matmul rate (FLOP/s, torch.mm) and exp rates (elements/s) for the current
    thread count N: the larger of the best call at N threads and N times the best call at one thread
    (on a shared CPU, calls at N threads wait for the slowest thread; one thread per core is what the
    cores can do), over a few sizes and repeats."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        mm1, ex1 = _best_rates(repeats)
    finally:
        torch.set_num_threads(threads)
    mm, ex = _best_rates(repeats)
    return max(mm, threads * mm1), {k: max(ex[k], threads * ex1[k]) for k in ex}


def _best_rates(repeats):
    mm = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        mm = max(mm, 2 * n**3 / min(times))
    exps = {"torch.exp": lambda x: torch.exp(x, out=x)}
    if relative_attention.kernel_available():
        exps["kernel exp"] = relative_attention._C.fast_exp_
    ex = {}
    for name, exp in exps.items():
        ex[name] = 0.0
        for n in (1 << 18, 1 << 20, 1 << 22):
            x = -torch.rand(n) * 20  # logits minus their max
            reps = max(repeats, (1 << 25) // n)
            times = []
            for _ in range(reps + 1):
                y = x.clone()
                t0 = time.perf_counter()
                exp(y)
                times.append(time.perf_counter() - t0)
            ex[name] = max(ex[name], n / min(times[1:]))
    return mm, ex


def floor_work(B, Nh, H, W, dkh, dvh):
    """Unavoidable (FLOPs, exps) of the forward pass and of forward+backward; see the module docstring."""
    HW = H * W
    pairs = B * Nh * HW * HW
    rel_proj = 2 * B * Nh * HW * (H + W) * dkh
    fwd_flops = 2 * pairs * dkh + rel_proj + 2 * pairs + 2 * pairs * dvh
    bwd_flops = 2 * pairs * (2 * dkh + 2 * dvh) + 2 * pairs + 2 * rel_proj
    return {"forward": (fwd_flops, pairs), "train": (fwd_flops + bwd_flops, pairs)}


def warm_up():
    """One call of each path and mode on a small map (thread pools, caches, first-call costs)."""
    inputs, grad_out = make_inputs(2, 8, 12, 20, 13, 6)
    for p in PATHS:
        if p != "kernel" or relative_attention.kernel_available():
            for train in (False, True):
                run_once(inputs, grad_out, p, train)


def sweep(args):
    """Naive vs the other paths on small maps at the res5 widths: where "auto" should switch."""
    B, Nh = args.batch, args.heads
    dk, dv = attention_depths(SIZES["res5"][2], Nh, args.kappa, args.upsilon)
    paths = [p for p in PATHS if p != "kernel" or relative_attention.kernel_available()]
    print("\n| HxW | HW | mode | " + " | ".join(f"{p} (ms)" for p in paths) + " | fastest |")
    print("|---|---|---|" + "---|" * (len(paths) + 1))
    rows = []
    for H, W in ((4, 4), (8, 8), (12, 16), (16, 24), (20, 32), (24, 40), (28, 44), (32, 48)):
        inputs, grad_out = make_inputs(B, Nh, H, W, dk // Nh, dv // Nh)
        for train in (False, True):
            times = {p: [] for p in paths}
            for _ in range(max(args.repeats, 5)):
                for p in paths:
                    times[p].append(run_once(inputs, grad_out, p, train)[0])
            med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
            best = min(med, key=med.get)
            mode = "train" if train else "forward"
            rows.append({"H": H, "W": W, "mode": mode, "ms": med})
            print(f"| {H}x{W} | {H * W} | {mode} | " + " | ".join(f"{med[p]:.1f}" for p in paths) + f" | {best} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sweep": rows, "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=1)
    return rows


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def bench_size(name, args, rates, factors):
    """Times and peaks of every path on one map; factors: naive peak / dense logits bytes per mode."""
    H, W, fout = SIZES[name]
    dk, dv = attention_depths(fout, args.heads, args.kappa, args.upsilon)
    dkh, dvh = dk // args.heads, dv // args.heads
    B, Nh = args.batch, args.heads
    inputs, grad_out = make_inputs(B, Nh, H, W, dkh, dvh)
    logits_bytes = B * Nh * (H * W) ** 2 * 4
    est_naive = factors["forward"] * logits_bytes
    limit = (args.naive_max_gib if args.naive_max_gib is not None else mem_available_gib() / 2) * GiB
    wanted = args.paths.split(",")
    paths = [p for p in PATHS if p in wanted and (p != "kernel" or relative_attention.kernel_available())]
    skipped = {}
    if "naive" in paths and est_naive > limit:
        paths.remove("naive")
        skipped["naive"] = est_naive
    modes = ["forward"] if args.no_train else ["forward", "train"]
    rec = {p: {m: {"times": [], "peak": 0} for m in modes} for p in paths}
    outputs = {}
    for rep in range(args.repeats):
        for mode in modes:
            for p in paths:
                entry = rec[p][mode]
                if rep > 0 and entry["times"] and entry["times"][0] > args.long_call:
                    continue
                seconds, peak, out, grads, cpu = run_once(inputs, grad_out, p, mode == "train")
                entry["times"].append(seconds)
                entry.setdefault("cpu", []).append(cpu)
                entry["peak"] = max(entry["peak"], peak)
                if rep == 0:
                    outputs[(p, mode)] = (out, grads)
    ref = next(p for p in PATHS if p in paths)
    row = {"size": name, "H": H, "W": W, "B": B, "Nh": Nh, "dkh": dkh, "dvh": dvh, "reference": ref,
           "threads": torch.get_num_threads(),
           "naive_logits_bytes": logits_bytes, "paths": {}, "skipped": {}}
    modes_est = {m: factors[m] * logits_bytes for m in modes}
    for p in skipped:
        row["skipped"][p] = {"estimated_peak_bytes": modes_est}
    work = floor_work(B, Nh, H, W, dkh, dvh)
    row["floor"] = {}
    for mode in modes:
        flops, exps = work[mode]
        row["floor"][mode] = {
            "flops": flops,
            "exps": exps,
            "seconds": flops / rates["matmul_flops"] + exps / rates["exp_per_s"],
            "seconds_torch_exp": flops / rates["matmul_flops"] + exps / rates["exp_rates"]["torch.exp"],
        }
    for p in paths:
        prow = row["paths"][p] = {}
        for mode in modes:
            entry = rec[p][mode]
            out, grads = outputs[(p, mode)]
            ref_out, ref_grads = outputs[(ref, mode)]
            t = statistics.median(entry["times"])
            prow[mode] = {
                "seconds": t,
                "calls": len(entry["times"]),
                "peak_bytes": entry["peak"],
                "max_abs_diff_out": max_diff(out, ref_out),
                "best_seconds": min(entry["times"]),
                # CPU seconds per wall second of the calls: about the thread count when the cores were
                # this process's, lower when other processes held them (the floor assumes all threads).
                "cores_used": sum(entry["cpu"]) / sum(entry["times"]),
                "floor_multiple": t / row["floor"][mode]["seconds"],
                "best_floor_multiple": min(entry["times"]) / row["floor"][mode]["seconds"],
                "floor_multiple_torch_exp": t / row["floor"][mode]["seconds_torch_exp"],
            }
            if grads is not None:
                prow[mode]["max_abs_diff_grad"] = max(max_diff(a, b) for a, b in zip(grads, ref_grads))
    auto = relative_attention._choose_impl(inputs[0])
    row["auto"] = auto
    return row


def fmt_bytes(n):
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def print_tables(rows, rates, modes):
    exps = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in rates["exp_rates"].items())
    print(f"\nmatmul rate {rates['matmul_flops'] / 1e9:.1f} GFLOP/s; exp rate {rates['exp_per_s'] / 1e9:.2f} Gexp/s "
          f"(best of: {exps} Gexp/s); {rates['threads']} threads")
    for mode in modes:
        print(f"\n### {mode} ({'no autograd' if mode == 'forward' else 'forward + backward'})\n")
        print(format_table(*table_rows(rows, mode)))


def table_rows(rows, mode):
    """(header, rows) of the Markdown table of one mode."""
    header = ("map", "HW", "dkh/dvh", "path", "time (s)", "best (s)", "peak mem", "naive/path time",
              "naive/path mem", "max abs diff out", "max abs diff grad", "floor (s)", "time/floor",
              "best/floor", "time/floor at torch.exp rate", "cores used", "time/floor at the cores used")
    table = []
    for row in rows:
        naive = row["paths"].get("naive", {}).get(mode)
        floor = row["floor"][mode]["seconds"]
        head = (f"{row['size']} {row['H']}x{row['W']}", row["H"] * row["W"], f"{row['dkh']}/{row['dvh']}")
        for p in PATHS:
            if p in row["skipped"]:
                est = row["skipped"][p]["estimated_peak_bytes"][mode]
                table.append(head + (p, "skipped", "-", f"est. {fmt_bytes(est)}") + ("-",) * 4 + (f"{floor:.3f}",)
                             + ("-",) * 5)
                continue
            if p not in row["paths"]:
                continue
            r = row["paths"][p][mode]
            t_ratio = f"{naive['seconds'] / r['seconds']:.2f}" if naive else "-"
            m_ratio = f"{naive['peak_bytes'] / max(r['peak_bytes'], 1):.1f}" if naive else "-"
            if not naive and "naive" in row["skipped"]:
                m_ratio = f"est. {row['skipped']['naive']['estimated_peak_bytes'][mode] / max(r['peak_bytes'], 1):.0f}"
            gdiff = f"{r['max_abs_diff_grad']:.1e}" if "max_abs_diff_grad" in r else "-"
            cores = r.get("cores_used")
            at_cores = "-"
            if cores is not None and "threads" in row:
                at_cores = f"{r['floor_multiple'] * cores / row['threads']:.1f}"
            table.append(head + (p, f"{r['seconds']:.3f}", f"{r['best_seconds']:.3f}", fmt_bytes(r["peak_bytes"]),
                                 t_ratio, m_ratio, f"{r['max_abs_diff_out']:.1e}", gdiff, f"{floor:.3f}",
                                 f"{r['floor_multiple']:.1f}", f"{r['best_floor_multiple']:.1f}",
                                 f"{r['floor_multiple_torch_exp']:.1f}", "-" if cores is None else f"{cores:.2f}",
                                 at_cores))
        table.append(head + (f"auto -> {row['auto']}",) + ("",) * 13)
    return header, table


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    modes = ["forward"] if args.no_train else ["forward", "train"]
    warm_up()
    if args.sweep:
        return sweep(args)
    mm, exps = measure_rates()
    # The floor uses the fastest exp measured (the kernel's own polynomial exp where it is built).
    rates = {"matmul_flops": mm, "exp_per_s": max(exps.values()), "exp_rates": exps,
             "threads": torch.get_num_threads()}
    # Naive peak / dense-logits size, measured on the largest map the naive path ran on (4 until then).
    factors = {m: 4.0 for m in modes}
    rows = []
    for name in sorted(sizes, key=lambda s: SIZES[s][0] * SIZES[s][1]):
        row = bench_size(name, args, rates, factors)
        if "naive" in row["paths"]:
            for m in modes:
                factors[m] = row["paths"]["naive"][m]["peak_bytes"] / row["naive_logits_bytes"]
        rows.append(row)
        print(f"{name} done", flush=True)
    print_tables(rows, rates, modes)
    print("\nauto rule: the kernel for CPU tensors when it is built; otherwise naive up to "
          f"NAIVE_MAX_PIXELS={relative_attention.NAIVE_MAX_PIXELS} pixels, fused above")
    meta = dict(
        environment(),
        kernel_isa=relative_attention._C.kernel_isa() if relative_attention.kernel_available() else None,
        naive_max_pixels=relative_attention.NAIVE_MAX_PIXELS,
        rates=rates,
        args=vars(args),
    )
    print(f"torch {meta['torch']}, {meta['threads']} threads, kernel isa {meta['kernel_isa']}, {meta['date']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
