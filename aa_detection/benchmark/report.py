"""BENCHMARKS.md: the runs of the attention and model benchmarks, their raw results kept as JSON, the
rendering (tables, sentences drawn from the numbers) and the targets.

Each run is one JSON file in the results folder, named by what it measured and where:
`attention_<device>[_<amp>].json` and `model_<variant>_<device>[_<amp>].json`, with the command that
produced it and its wall time under "run". `render` reads whatever the folder holds, so the CPU results
and GPU results measured on different machines land in one file.
"""
import argparse
import json
import multiprocessing
import os
import re
import shlex
import tempfile
import time
from typing import Dict, List, Optional

from ..safe_io import atomic_write
from . import attention
from ..utils.table import format_table
from .common import AMP_DTYPES, compare_times, fmt_bytes, resolve_device

__all__ = ["VARIANTS", "add_arguments", "attention_targets", "main", "model_targets", "profile_summary", "render"]

VARIANTS = {"res4-res5": "['res4','res5']", "res3-res5": "['res3','res4','res5']"}
# (variant, figure key, limit of AA / baseline); figures as in model.run's results.
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
DEFAULT_PATHS = {"cpu": "naive,kernel", "cuda": "naive,fused,flex"}
TOOLS = {"attention": "tools/benchmark_attention.py", "model": "tools/benchmark.py"}
FILE_NAME = re.compile(r"^(?:attention|model_(?P<variant>" + "|".join(VARIANTS) + r"))_(?P<key>(?:cpu|cuda)\S*)\.json$")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of tools/make_benchmarks.py."""
    p = parser
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--device", default="cpu", help="device of the runs (cpu or cuda)")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=sorted(AMP_DTYPES),
                   help="run under torch.autocast to this dtype (bf16 when given alone)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model and per attention path")
    p.add_argument("--attention-paths", default=None,
                   help="paths of the attention benchmark (default: " + "; ".join(
                       f"{k}: {v}" for k, v in DEFAULT_PATHS.items()) + "; naive is skipped where it would not fit)")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--keep-json", default=None,
                   help="folder of the raw results (default: docs/benchmarks beside the default --out, a "
                   "temporary folder for any other --out)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the results already in the results folder instead of measuring them again; "
                   "only what is missing there is measured")
    return p


def result_key(device: str, amp: Optional[str]) -> str:
    return device + (f"_{amp}" if amp else "")


def jobs(args: argparse.Namespace, key: str, folder: str) -> Dict[str, tuple]:
    """{JSON path: (benchmark, flags)} of the runs of one device and precision."""
    amp = ["--amp", args.amp] if args.amp else []
    found = {}
    if not args.skip_attention:
        paths = args.attention_paths or DEFAULT_PATHS[resolve_device(args.device).type]
        path = os.path.join(folder, f"attention_{key}.json")
        found[path] = ("attention", ["--device", args.device, *amp, "--paths", paths, "--repeats", str(args.repeats),
                                     "--json", path])
    if not args.skip_models:
        for variant, stages in VARIANTS.items():
            path = os.path.join(folder, f"model_{variant}_{key}.json")
            flags = ["--size", *map(str, args.size), "--device", args.device, *amp, "--repeats", str(args.repeats),
                     "--profile", "--json", path, *(["--no-stages"] if variant != "res3-res5" else [])]
            found[path] = ("model", [*flags, "MODEL.AA.STAGES", stages])
    return found


def _run_benchmark(benchmark: str, argv: List[str]) -> None:
    if benchmark == "model":
        from . import model as module  # needs detectron2, which the attention benchmark does not
    else:
        module = attention
    module.main(module.add_arguments(argparse.ArgumentParser()).parse_args(argv))


def run_isolated(benchmark: str, argv: List[str]) -> float:
    """Runs a benchmark in a fresh Python process (so one's memory peak cannot bleed into the next), as
    its tool would with these flags; returns its wall seconds."""
    start = time.perf_counter()
    process = multiprocessing.get_context("spawn").Process(target=_run_benchmark, args=(benchmark, argv))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{TOOLS[benchmark]} {shlex.join(argv)} failed with exit status {process.exitcode}")
    return time.perf_counter() - start


def measure(args: argparse.Namespace, folder: str) -> None:
    """Runs the benchmarks of args.device (and --amp) into the folder, skipping those kept there with --reuse."""
    resolve_device(args.device)
    for path, (benchmark, flags) in jobs(args, result_key(args.device, args.amp), folder).items():
        if args.reuse and os.path.exists(path):
            continue
        command = f"{TOOLS[benchmark]} {shlex.join(flags)}"
        print(f"$ {command}", flush=True)
        seconds = run_isolated(benchmark, flags)
        with open(path) as f:
            results = json.load(f)
        results["run"] = {"command": command.replace(folder, "FOLDER"), "seconds": seconds}
        with atomic_write(path, "w") as f:
            json.dump(results, f, indent=1)


def load_results(folder: str) -> Dict[str, Dict]:
    """{key (device[_amp]): {"attention": results or None, "models": {variant: results}}} of the folder's
    files, the CPU first, the model variants in VARIANTS order."""
    found = {}
    for name in os.listdir(folder):
        match = FILE_NAME.match(name)
        if match:
            with open(os.path.join(folder, name)) as f:
                found[(match["key"], match["variant"])] = json.load(f)
    results = {}
    for key in sorted({k for k, _ in found}, key=lambda k: (k != "cpu", k)):
        results[key] = {"attention": found.get((key, None)),
                        "models": {v: found[(key, v)] for v in VARIANTS if (key, v) in found}}
    return results


def status(ok: bool) -> str:
    return "met" if ok else "NOT met"


def attention_targets(data: Dict, prefix: str = "") -> List[tuple]:
    """Target rows: the kernel path (CPU) or flex (CUDA) within ATTENTION_FLOOR_LIMIT of the floor at res4 and res3."""
    rows = []
    for row in data["rows"]:
        path = next((p for p in ("kernel", "flex") if p in row["paths"]), None)
        if row["size"] not in ("res3", "res4") or path is None:
            continue
        for mode, r in row["paths"][path].items():
            measured = f"{r['floor_multiple']:.2f} (best {r['best_floor_multiple']:.2f}"
            cores = r["time"].get("cores_used")
            if cores:
                measured += f"; {r['floor_multiple'] * cores / row['threads']:.2f} at the {cores:.2f} cores used"
            ok = r["floor_multiple"] <= ATTENTION_FLOOR_LIMIT
            rows.append((f"{prefix}attention {row['size']} {mode} ({path}) time / floor",
                         f"<= {ATTENTION_FLOOR_LIMIT:g}", measured + ")", status(ok)))
    return rows


def _figure(result: Dict, key: str) -> float:
    value = result[key]
    return value["median"] if isinstance(value, dict) else value


def model_targets(models: Dict[str, Dict], prefix: str = "") -> List[tuple]:
    """Target rows of the model benchmarks: AA / baseline ratios, the training peak, the parameters."""
    rows = []
    for variant, key, limit in MODEL_TARGETS:
        if variant not in models or key not in models[variant]["aa"]:
            continue
        res = models[variant]
        ratio = _figure(res["aa"], key) / _figure(res["baseline"], key)
        rows.append((f"{prefix}{variant}: AA / baseline {LABELS[key]}", f"<= {limit:g}", f"{ratio:.3f}",
                     status(ratio <= limit)))
    if "res3-res5" in models and "train_peak_GiB" in models["res3-res5"]["aa"]:
        peak = models["res3-res5"]["aa"]["train_peak_GiB"]
        rows.append((f"{prefix}res3-res5: AA training peak (batch 2)", f"<= {HOST_MEMORY_LIMIT_GIB:g} GiB",
                     f"{peak:.2f} GiB", status(peak <= HOST_MEMORY_LIMIT_GIB)))
    for variant, res in models.items():
        b, a = res["baseline"]["params_M"], res["aa"]["params_M"]
        rows.append((f"{prefix}{variant}: params AA <= baseline", f"<= {b:.2f}M", f"{a:.2f}M", status(a <= b)))
    return rows


def profile_summary(result: Dict) -> str:
    """Where the AA model's extra profiled inference time goes, with the operators other than attention
    compared with the spread of the timed inference runs."""
    profile = result.get("profile")
    if not profile:
        return ""
    kind = "device" if result.get("device", "cpu").startswith("cuda") else "CPU"
    base, aa = sum(profile["baseline"].values()), sum(profile["aa"].values())
    attn = sum(v for k, v in profile["aa"].items() if "attention" in k.lower())
    extra = aa - base
    text = (f"Profile (one inference of each model): the AA model's self {kind} time is {aa:.2f} s against the "
            f"baseline's {base:.2f} s ({extra:+.2f} s); operators named \"attention\" take {attn:.2f} s")
    text += f" ({100 * attn / extra:.0f}% of the difference)" if extra > 0 else ""
    other = extra - attn
    text += f", and all the other operators together {other:+.2f} s"
    times = [result[n]["inference_s"] for n in ("baseline", "aa")]
    if min(len(t["runs"]) for t in times) < 2:
        return text + "; one timed inference run per model, so no spread was measured to compare that with."
    spread = max(t["max"] - t["min"] for t in times)
    if abs(other) <= spread:
        return text + f", within the spread of the timed inference runs ({spread:.2f} s): within the noise."
    return text + (f", more than the spread of the timed inference runs ({spread:.2f} s): the layer's other "
                   "work (or the difference in the rest of the network) costs measurably.")


def model_section(variant: str, result: Dict, level: str = "##") -> List[str]:
    from . import model

    lines = ["", f"{level} AA-R50 / R50 RetinaNet, attention in {variant}", "", model.report(result), ""]
    base, aa = result["baseline"], result["aa"]
    for label, key in (("inference", "inference_s"), ("training step", "train_iter_s")):
        if key in base:
            lines.append(f"- {compare_times(f'AA {label}', aa[key], 'baseline', base[key])}")
    summary = profile_summary(result)
    if summary:
        lines.append(f"- {summary}")
    return lines


def attention_sentences(data: Dict, mode: str) -> List[str]:
    """Per map: which path is fastest and whether the runs tell it from the next one; where no reference ran."""
    lines = []
    for row in data["rows"]:
        name = f"{row['size']} {row['H']}x{row['W']} {mode}"
        times = {p: r[mode]["time"] for p, r in row["paths"].items()}
        ranked = sorted(times, key=lambda p: times[p]["median"])
        if len(ranked) > 1:
            second, first = ranked[1], ranked[0]
            lines.append(f"- {name}: fastest {first}; {compare_times(second, times[second], first, times[first])}")
        skipped = row["skipped"].get("naive")
        if skipped:
            lines.append(f"- {name}: naive skipped (estimated {fmt_bytes(skipped['estimated_peak_bytes'][mode])} "
                         f"against a budget of {fmt_bytes(skipped['budget_bytes'])}), so no path has an independent "
                         "reference here and the difference columns are empty.")
    return lines


def attention_section(data: Dict, level: str = "##") -> List[str]:
    meta = data["meta"]
    lines = [
        "", f"{level} Attention alone", "",
        "`tools/benchmark_attention.py`: the maps of an 800x1333 input (batch 2, Nh=8, kappa=0.2, upsilon=0.1 "
        "widths), paths in turns in one process, median of the timed calls (best in its own column); "
        "\"forward\" without autograd, \"train\" forward + backward. The kernel path is timed as the layer "
        "calls it, on the qkv convolution's output. Differences are against the naive path (the dense "
        "reference) and empty where it did not run. The floor is the attention's unavoidable work at the "
        "device's measured rates (see `aa_detection/benchmark/attention.py`).",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items() if k not in ("rates", "args")) + ".",
        "",
        "Rates: " + attention.rates_line(meta) + ".",
    ]
    for mode in attention.MODES:
        if all(mode in r["floor"] for r in data["rows"]):
            lines += ["", f"{level}# {mode}", "", format_table(*attention.table_rows(data["rows"], mode)), ""]
            lines += attention_sentences(data, mode)
    if data.get("flex_compile"):
        lines += ["", f"{level}# FlexAttention compile time", "", "The first call on each map, in this order "
                  "from a fresh process, against the calls after it (`--compile-times`).", "",
                  attention.compile_table(data["flex_compile"])]
    return lines


def gpu_instructions() -> List[str]:
    return [
        "No GPU measurements have been made yet. On a machine with a CUDA GPU, from the repository root:",
        "",
        "```bash",
        "# adds the GPU runs to docs/benchmarks/ (the CPU ones stay) and re-renders this file; then under autocast bf16",
        "python tools/make_benchmarks.py --device cuda --reuse",
        "python tools/make_benchmarks.py --device cuda --amp bf16 --reuse",
        "```",
        "",
        "or the benchmarks alone:",
        "",
        "```bash",
        "python tools/benchmark_attention.py --device cuda [--amp bf16]   # naive, fused, flex",
        "python tools/benchmark.py --device cuda [--amp bf16] --profile",
        "```",
        "",
        "On a GPU machine without a package registry, `python tools/gpu_check.py` installs what is missing from "
        "carried files and runs these benchmarks, the CUDA tests and a short training; copy its JSON results into "
        "`docs/benchmarks/` and re-render with `--reuse` (docs/PERFORMANCE.md, \"The GPU check\").",
    ]


def result_sections(entry: Dict, level: str) -> List[str]:
    """The model and attention sections of one device and precision, headed at `level`."""
    lines = [line for variant, result in entry["models"].items() for line in model_section(variant, result, level)]
    return lines + (attention_section(entry["attention"], level) if entry["attention"] else [])


def render(results: Dict[str, Dict]) -> str:
    """BENCHMARKS.md from load_results' dict."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python tools/make_benchmarks.py` from the raw results in `docs/benchmarks/` (do not edit "
        "by hand; `--reuse` re-renders without measuring). Random weights, synthetic images; every ratio is "
        "measured within one process, the two models (or attention paths) run in turns. Each section names "
        "the machine, threads and date of its runs; on a shared CPU the times are noisy (see \"cores used\").",
        "",
        "## Targets",
        "",
    ]
    targets = []
    for key, entry in results.items():
        prefix = "" if key == "cpu" else f"{key}: "
        if entry["attention"]:
            targets += attention_targets(entry["attention"], prefix)
        targets += model_targets(entry["models"], prefix)
    lines.append(format_table(("target", "limit", "measured", "status"), targets) if targets else "No results.")
    for key, entry in results.items():
        if key == "cpu":
            lines += result_sections(entry, "##")
        elif not key.startswith("cuda"):
            lines += ["", f"## {key}"] + result_sections(entry, "###")
    lines += ["", "## GPU", ""]
    gpu = {k: v for k, v in results.items() if k.startswith("cuda")}
    if not gpu:
        lines += gpu_instructions()
    for key, entry in gpu.items():
        lines += ["", f"### {key}"] + result_sections(entry, "####")
    runs = [(f"`{r['run']['command']}`", f"{r['run']['seconds']:.0f}")
            for entry in results.values() for r in [entry["attention"], *entry["models"].values()]
            if r and "run" in r]
    lines += ["", "## Runs", "", "FOLDER is the results folder (`--keep-json`).", "",
              format_table(("command", "seconds"), runs) if runs else "No run recorded.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace, default_out: str, default_folder: str) -> None:
    """Measures what is missing (or everything, without --reuse) into the results folder and renders
    args.out. The folder is --keep-json, else default_folder when args.out is default_out, else a
    temporary one."""
    started = time.perf_counter()
    folder = args.keep_json or (default_folder if os.path.abspath(args.out) == os.path.abspath(default_out) else None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.abspath(folder or tmp)
        os.makedirs(folder, exist_ok=True)
        measure(args, folder)
        text = render(load_results(folder))
    with atomic_write(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
