"""Cost of two detection models side by side: the AA model against its baseline, in one process.

For each config (default: the R-50 RetinaNet baseline and its AA twin), at one input size (default
800x1333, COCO's test size), with random weights, the models run in turns (`common.run_in_turns`):

- inference seconds per image (batch 1, no autograd state) and its peak memory;
- training seconds per iteration (batch `--train-batch`, forward + backward) and its peak memory;
- parameters and fvcore GFLOPs (attention matmuls counted);
- the inference cost of each augmented stage alone (MODEL.AA.STAGES set to that stage);
- with `--profile`, torch.profiler's self time per operator of one inference of each model.

On a GPU peak memory is the CUDA allocator's and the profile's times are device times; `--amp` runs the
models' forward passes under torch.autocast (bf16 or fp16).
"""
import argparse
from collections import Counter
import json
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
import torch
from torch.autograd import DeviceType

from ..analysis import count_parameters, flop_count
from ..config import add_overrides_argument, add_trust_config_argument, setup_cfg
from ..safe_io import atomic_write
from ..utils.table import format_table
from .common import AMP_DTYPES, GiB, autocast, environment, resolve_device, run_in_turns

__all__ = ["CONFIGS", "add_arguments", "extra_time_by_op", "main", "report", "run"]

CONFIGS = ["configs/retinanet_R_50_FPN_1x.yaml", "configs/retinanet_AA_R_50_FPN_1x.yaml"]
NAMES = ("baseline", "aa")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of tools/benchmark.py."""
    p = parser
    p.add_argument("--config-files", nargs=2, default=CONFIGS, metavar=("BASELINE", "AA"))
    add_trust_config_argument(p)
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=sorted(AMP_DTYPES),
                   help="run the models under torch.autocast to this dtype (bf16 when given alone)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model (median and spread)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage costs")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--profile", action="store_true", help="profile one inference of each model")
    p.add_argument("--json", help="write the results here")
    add_overrides_argument(p)
    return p


def build(config_file: str, opts: Sequence[str], device: torch.device,
          trusted: Sequence[str] = ()) -> Tuple[CfgNode, torch.nn.Module]:
    from detectron2.modeling import build_model

    cfg = setup_cfg(config_file, [*opts, "MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device)], trusted=trusted)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def random_batch(size: Tuple[int, int], batch: int, device: torch.device, num_classes: int,
                 boxes_per_image: int = 8) -> List[Dict]:
    """`batch` detectron2 inputs of (3, H, W) random images, with random ground-truth boxes."""
    from detectron2.structures import Boxes, Instances

    H, W = size
    generator = torch.Generator().manual_seed(0)
    batch_inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, H, W), generator=generator).float()
        xy = torch.rand(boxes_per_image, 2, generator=generator) * torch.tensor([W * 0.7, H * 0.7])
        wh = (torch.rand(boxes_per_image, 2, generator=generator) * 0.3 + 0.02) * torch.tensor([W, H])
        instances = Instances((H, W))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, num_classes, (boxes_per_image,), generator=generator)
        batch_inputs.append({"image": image.to(device), "height": H, "width": W, "instances": instances})
    return batch_inputs


def inference_step(model: torch.nn.Module, inputs: List[Dict], device: torch.device, amp: Optional[str]) -> None:
    model.eval()
    with torch.inference_mode(), autocast(device, amp):
        model(inputs)


def training_step(model: torch.nn.Module, inputs: List[Dict], device: torch.device, amp: Optional[str]) -> None:
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(), autocast(device, amp):
        losses = model(inputs)
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)


def profile_inference(model: torch.nn.Module, inputs: List[Dict], device: torch.device,
                      amp: Optional[str]) -> Dict[str, float]:
    """{op name: self seconds} of one inference: CPU time on the CPU; on a GPU, the device time of the
    kernels each operator launched (the operators' events only: the kernels' own events hold the same
    time again)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    model.eval()
    with torch.inference_mode(), autocast(device, amp), torch.profiler.profile(activities=activities) as prof:
        model(inputs)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    seconds = Counter()
    for event in prof.key_averages():
        if event.device_type == DeviceType.CPU and getattr(event, key) > 0:
            seconds[event.key] += getattr(event, key) / 1e6
    return dict(seconds)


def extra_time_by_op(profile: Dict[str, Dict[str, float]], rows: int = 12) -> List[Tuple[str, float, float, float]]:
    """[(op, baseline s, AA s, AA - baseline s)] for the ops that account for most of the AA model's extra time."""
    base, aa = profile["baseline"], profile["aa"]
    ops = sorted(set(base) | set(aa), key=lambda op: -(aa.get(op, 0) - base.get(op, 0)))
    return [(op, base.get(op, 0.0), aa.get(op, 0.0), aa.get(op, 0.0) - base.get(op, 0.0)) for op in ops[:rows]]


def run(args: argparse.Namespace) -> Dict:
    """The figures of both models (see the module docstring) as a JSON-ready dict."""
    device = resolve_device(args.device)
    built = {name: build(path, args.opts, device, args.trust_config) for name, path in zip(NAMES, args.config_files)}
    models = {name: model for name, (_, model) in built.items()}
    num_classes = built["baseline"][0].MODEL.RETINANET.NUM_CLASSES
    infer_inputs = [{k: v for k, v in x.items() if k != "instances"} for x in random_batch(args.size, 1, device, 1)]
    train_inputs = random_batch(args.size, args.train_batch, device, num_classes)
    results = {"environment": environment(device), "device": str(device), "amp": args.amp, "size": args.size,
               "train_batch": args.train_batch, "configs": dict(zip(NAMES, args.config_files))}

    for name, model in models.items():
        model.eval()
        flops, by_op = flop_count(model, infer_inputs)
        results[name] = {"params_M": count_parameters(model)["total"] / 1e6, "gflops": flops / 1e9,
                         "attention_gflops": by_op["attention"] / 1e9}

    measurements = [("inference_s", "inference_peak_GiB", inference_step, infer_inputs)]
    if not args.no_train:
        measurements.append(("train_iter_s", "train_peak_GiB", training_step, train_inputs))
    for time_key, memory_key, step, inputs in measurements:
        steps = {n: (lambda m=m: step(m, inputs, device, args.amp)) for n, m in models.items()}
        runs = run_in_turns(steps, device, args.repeats, args.warmup)
        for name in NAMES:
            results[name][time_key] = runs[name].summary()
            results[name][memory_key] = runs[name].peak_bytes / GiB

    if not args.no_stages:
        stages = {}
        for stage in built["aa"][0].MODEL.AA.STAGES:
            _, model = build(args.config_files[1], [*args.opts, "MODEL.AA.STAGES", [stage]], device, args.trust_config)
            pair = {"baseline": models["baseline"], stage: model}
            runs = run_in_turns({n: (lambda m=m: inference_step(m, infer_inputs, device, args.amp))
                                 for n, m in pair.items()}, device, args.repeats, warmup=1)
            model.eval()
            stages[stage] = {
                "inference_ratio": statistics.median(runs[stage].seconds) / statistics.median(runs["baseline"].seconds),
                "gflops_ratio": flop_count(model, infer_inputs)[0] / 1e9 / results["baseline"]["gflops"],
            }
            del model
        results["stages"] = stages

    if args.profile:
        results["profile"] = {n: profile_inference(m, infer_inputs, device, args.amp) for n, m in models.items()}
    return results


ROWS = [
    ("params (M)", "params_M", "{:.2f}"),
    ("GFLOPs", "gflops", "{:.1f}"),
    ("  of which attention", "attention_gflops", "{:.1f}"),
    ("inference s/img", "inference_s", "{:.3f}"),
    ("inference peak GiB", "inference_peak_GiB", "{:.2f}"),
    ("train s/iter", "train_iter_s", "{:.3f}"),
    ("train peak GiB", "train_peak_GiB", "{:.2f}"),
]


def report(results: Dict) -> str:
    """The results as text (Markdown tables): the figures, AA / baseline ratios and spreads, the cores used,
    each stage alone and the profile's largest differences."""
    base, aa = results["baseline"], results["aa"]
    table = []
    for label, key, fmt in ROWS:
        if key not in base:
            continue
        b, a = base[key], aa[key]
        spread = ""
        if isinstance(b, dict):
            spread = f"{b['min']:.3f}-{b['max']:.3f} \\| {a['min']:.3f}-{a['max']:.3f}"
            b, a = b["median"], a["median"]
        table.append((label, fmt.format(b), fmt.format(a), f"{a / b:.3f}" if b else "-", spread))
    H, W = results["size"]
    amp = f", autocast {results['amp']}" if results.get("amp") else ""
    lines = [
        f"{results['configs']['baseline']} vs {results['configs']['aa']} at {H}x{W} on {results.get('device', 'cpu')}"
        f"{amp}, training batch {results.get('train_batch', 2)}",
        "",
        ", ".join(f"{k}: {v}" for k, v in results["environment"].items()),
        "",
        format_table(("", "baseline", "AA", "AA/baseline", "min-max s (baseline \\| AA)"), table),
    ]
    used = [(label, base[key].get("cores_used"), aa[key].get("cores_used")) for label, key in
            (("inference", "inference_s"), ("training", "train_iter_s")) if isinstance(base.get(key), dict)]
    if used and all(b is not None and a is not None for _, b, a in used):
        lines += ["", "Cores used (CPU s per wall s; the thread count on an idle machine), baseline / AA: " + ", ".join(
            f"{label} {b:.2f} / {a:.2f}" for label, b, a in used) + "."]
    if "stages" in results:
        stage_rows = [(stage, f"{v['inference_ratio']:.3f}", f"{v['gflops_ratio']:.3f}")
                      for stage, v in results["stages"].items()]
        lines += ["", "Each augmented stage alone (ratio to the baseline):", "",
                  format_table(("stage", "inference", "GFLOPs"), stage_rows)]
    if "profile" in results:
        total = {n: sum(ops.values()) for n, ops in results["profile"].items()}
        kind = "device" if results.get("device", "cpu").startswith("cuda") else "CPU"
        rows = [(op, f"{b:.3f}", f"{a:.3f}", f"{d:+.3f}") for op, b, a, d in extra_time_by_op(results["profile"])]
        lines += ["", f"Where the AA model's extra inference time goes (torch.profiler, self {kind} seconds; "
                  f"total {total['baseline']:.2f} vs {total['aa']:.2f}):", "",
                  format_table(("op", "baseline", "AA", "AA - baseline"), rows)]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> Dict:
    """Runs the benchmark of the parsed flags, prints its report and writes --json; returns the results."""
    results = run(args)
    print(report(results))
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results
