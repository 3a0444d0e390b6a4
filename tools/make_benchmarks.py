#!/usr/bin/env python
"""Regenerate BENCHMARKS.md: the attention benchmark and the model benchmarks, with the targets checked.

Runs, each in its own process (so one's memory peak cannot bleed into the next):

1. `tools/benchmark_attention.py` on the res5, res4 and res3 maps of an 800x1333 input (batch 2, Nh=8);
2. `tools/benchmark.py --profile` for the R-50 RetinaNet baseline against its AA twin with attention in
   res4 and res5;
3. the same with attention in res3, res4 and res5 (the default AA config), with the per-stage costs;

then writes BENCHMARKS.md (atomically) with the machine, torch version, threads and date, the tables,
each target with its measured ratio and whether it is met, and the profile summaries.

    python tools/make_benchmarks.py                      # about 15 minutes on a quiet 2-core CPU
    python tools/make_benchmarks.py --repeats 1 --size 400 667 --out /tmp/B.md   # a quick smoke run
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from aa_detection.safe_io import atomic_write  # noqa: E402
from aa_detection.utils.bench import environment, format_table  # noqa: E402

VARIANTS = {"res4-res5": "['res4','res5']", "res3-res5": "['res3','res4','res5']"}
# (variant, figure key, limit of AA / baseline); figures as in tools/benchmark.py's JSON.
MODEL_TARGETS = [
    ("res4-res5", "inference_s", 1.15),
    ("res4-res5", "train_iter_s", 1.3),
    ("res4-res5", "train_peak_GiB", 1.3),
    ("res3-res5", "inference_s", 2.5),
    ("res3-res5", "train_peak_GiB", 1.5),
]
ATTENTION_FLOOR_LIMIT = 3.0
HOST_MEMORY_LIMIT_GIB = 16.0
LABELS = {"inference_s": "inference s/img", "train_iter_s": "train s/iter", "train_peak_GiB": "train peak memory"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--device", default="cpu", help="device of the model benchmarks (cpu or cuda)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model and per attention path")
    p.add_argument("--attention-paths", default="naive,kernel",
                   help="paths of the attention benchmark (naive is skipped where it would not fit)")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--keep-json", default=None, help="also keep the raw results (JSON, printed tables) in this folder")
    p.add_argument("--reuse", action="store_true",
                   help="with --keep-json: reuse the results already in that folder instead of measuring again")
    return p.parse_args(argv)


def run_tool(args, log, json_path, reuse=False):
    """Runs a tool in a fresh Python process (it writes json_path); returns its stdout, also kept beside
    json_path. With reuse, a result already there is read instead."""
    text_path = json_path[:-len(".json")] + ".txt"
    seconds_path = json_path[:-len(".json")] + ".seconds"
    if reuse and os.path.exists(json_path) and os.path.exists(text_path):
        seconds = None
        if os.path.exists(seconds_path):
            with open(seconds_path) as f:
                seconds = float(f.read())
        log.append((" ".join(args), seconds))
        with open(text_path) as f:
            return f.read()
    cmd = [sys.executable, *args]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.append((" ".join(args), seconds))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{args[0]} failed with exit status {proc.returncode}")
    with open(text_path, "w") as f:
        f.write(proc.stdout)
    with open(seconds_path, "w") as f:
        f.write(f"{seconds:.1f}")
    return proc.stdout


def status(ok):
    return "met" if ok else "NOT met"


def attention_section(data):
    from benchmark_attention import table_rows

    rates = data["meta"]["rates"]
    exps = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in rates["exp_rates"].items())
    lines = [
        "## Attention alone",
        "",
        "`tools/benchmark_attention.py`: the maps of an 800x1333 input (batch 2, Nh=8, kappa=0.2, upsilon=0.1 "
        "widths), paths side by side in one process, median of the timed calls (best in its own column); "
        "\"forward\" without autograd, \"train\" forward + backward. The kernel path is timed as the layer "
        "calls it, on the qkv convolution's output. The floor is the attention's unavoidable work at this "
        "machine's measured rates (see the tool's docstring): "
        f"matmul {rates['matmul_flops'] / 1e9:.1f} GFLOP/s, exp {rates['exp_per_s'] / 1e9:.2f} Gexp/s "
        f"(best of: {exps} Gexp/s); kernel instruction set {data['meta'].get('kernel_isa')}.",
    ]
    for mode in ("forward", "train"):
        if all(mode in r["floor"] for r in data["rows"]):
            lines += ["", f"### {mode}", "", format_table(*table_rows(data["rows"], mode))]
    return "\n".join(lines)


def attention_targets(data):
    rows = []
    for row in data["rows"]:
        if row["size"] not in ("res3", "res4") or "kernel" not in row["paths"]:
            continue
        for mode, r in row["paths"]["kernel"].items():
            ok = r["floor_multiple"] <= ATTENTION_FLOOR_LIMIT
            measured = f"{r['floor_multiple']:.2f} (best {r['best_floor_multiple']:.2f}"
            if r.get("cores_used") and row.get("threads"):
                measured += f"; {r['floor_multiple'] * r['cores_used'] / row['threads']:.2f} at the {r['cores_used']:.2f} cores used"
            rows.append((f"attention {row['size']} {mode} (kernel) time / floor", f"<= {ATTENTION_FLOOR_LIMIT:g}",
                         measured + ")", status(ok)))
    return rows


def figure(result, key):
    value = result[key]
    return value["median"] if isinstance(value, dict) else value


def model_targets(models):
    rows = []
    for variant, key, limit in MODEL_TARGETS:
        if variant not in models or key not in models[variant]["aa"]:
            continue
        res = models[variant]
        ratio = figure(res["aa"], key) / figure(res["baseline"], key)
        rows.append((f"{variant}: AA / baseline {LABELS[key]}", f"<= {limit:g}", f"{ratio:.3f}", status(ratio <= limit)))
    if "res3-res5" in models and "train_peak_GiB" in models["res3-res5"]["aa"]:
        peak = models["res3-res5"]["aa"]["train_peak_GiB"]
        rows.append(("res3-res5: AA training peak (batch 2)", f"<= {HOST_MEMORY_LIMIT_GIB:g} GiB", f"{peak:.2f} GiB",
                     status(peak <= HOST_MEMORY_LIMIT_GIB)))
    for variant, res in models.items():
        b, a = res["baseline"]["params_M"], res["aa"]["params_M"]
        rows.append((f"{variant}: params AA <= baseline", f"<= {b:.2f}M", f"{a:.2f}M", status(a <= b)))
    return rows


def profile_summary(result):
    """One sentence on where the AA model's extra inference time goes, from the profiles."""
    profile = result.get("profile")
    if not profile:
        return ""
    base, aa = sum(profile["baseline"].values()), sum(profile["aa"].values())
    kernel = sum(v for k, v in profile["aa"].items() if "attention" in k.lower())
    extra = aa - base
    if extra <= 0:
        return (f"Profile: the AA model's inference took no more self CPU time than the baseline's (AA {aa:.2f} s, "
                f"baseline {base:.2f} s): the profiled runs were too noisy to tell; the attention took {kernel:.2f} s.")
    return (f"Profile: the AA model's inference takes {extra:.2f} s more self CPU time than the baseline's "
            f"(AA {aa:.2f} s, baseline {base:.2f} s); the attention kernel itself accounts for {kernel:.2f} s of it "
            f"({100 * kernel / extra:.0f}%; the other operators' differences, table above, are within the noise).")


def main(argv=None):
    args = parse_args(argv)
    log = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.abspath(args.keep_json or tmp)
        os.makedirs(folder, exist_ok=True)
        attention = None
        if not args.skip_attention:
            path = os.path.join(folder, "attention.json")
            run_tool(["tools/benchmark_attention.py", "--paths", args.attention_paths, "--repeats", str(args.repeats),
                      "--json", path], log, path, args.reuse)
            with open(path) as f:
                attention = json.load(f)
            for row in attention["rows"]:
                row.setdefault("threads", attention["meta"].get("threads"))
        models, reports = {}, {}
        if not args.skip_models:
            for variant, stages in VARIANTS.items():
                path = os.path.join(folder, f"model_{variant}.json")
                cmd = ["tools/benchmark.py", "--size", *map(str, args.size), "--device", args.device,
                       "--repeats", str(args.repeats), "--profile", "--json", path]
                if variant != "res3-res5":
                    cmd.append("--no-stages")
                reports[variant] = run_tool([*cmd, "--opts", "MODEL.AA.STAGES", stages], log, path, args.reuse)
                with open(path) as f:
                    models[variant] = json.load(f)

    env = environment(args.device)
    H, W = args.size
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python tools/make_benchmarks.py` (do not edit by hand). Random weights, synthetic images "
        f"of {H}x{W}; every ratio is measured within one process, the two models (or attention paths) run in turns.",
        "",
        "Environment: " + ", ".join(f"{k}: {v}" for k, v in env.items())
        + f"; load average at the end {os.getloadavg()[0]:.1f} (other processes' load makes the times noisy: "
        "see \"cores used\"); run times in \"Runs\" below.",
        "",
        "## Targets",
        "",
        format_table(("target", "limit", "measured", "status"),
                     (attention_targets(attention) if attention else []) + model_targets(models)),
    ]
    for variant, text in reports.items():
        lines += ["", f"## AA-R50 / R50 RetinaNet, attention in {variant}", "", "```", text.strip(), "```"]
        summary = profile_summary(models[variant])
        if summary:
            lines += ["", summary]
    if attention:
        lines += ["", attention_section(attention)]
    lines += [
        "",
        "## GPU",
        "",
        "`tools/benchmark.py --device cuda` runs the same comparison on a GPU (peak memory from the CUDA "
        "allocator) and `python tools/make_benchmarks.py --device cuda` puts it here. On the GPU the attention "
        "takes the fused `scaled_dot_product_attention` path (or the dense one on small maps); the compiled "
        "kernel is CPU-only. "
        + ("Not measured in this run (no GPU)." if not torch.cuda.is_available() or args.device == "cpu" else ""),
        "",
        "## Runs",
        "",
        "Results reused with `--reuse` show no run time; FOLDER is the `--keep-json` folder (a temporary one by default).",
        "",
        format_table(("command", "seconds"),
                     [(f"`{cmd.replace(folder, 'FOLDER')}`", "reused (not recorded)" if sec is None else f"{sec:.0f}")
                      for cmd, sec in log]),
        "",
    ]
    with atomic_write(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
