#!/usr/bin/env python
"""Cost of two detection models side by side: the AA model against its baseline, in one process.

For each config (default: the R-50 RetinaNet baseline and its AA twin), at one input size (default
800x1333, COCO's test size), with random weights:

- inference seconds per image (batch 1, no autograd state), alternating between the models;
- training seconds per iteration (batch `--train-batch`, forward + backward) and its peak memory;
- parameters and fvcore GFLOPs (attention matmuls counted);
- the inference cost of each augmented stage alone (MODEL.AA.STAGES set to that stage).

Prints one table with the AA / baseline ratio of each figure and writes it as JSON with `--json`.
`--profile` adds a torch.profiler summary of where the AA model's extra inference time goes.

    python tools/benchmark.py
    python tools/benchmark.py --size 640 640 --opts MODEL.AA.STAGES "['res4','res5']"
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from aa_detection.analysis import count_parameters, flop_count  # noqa: E402
from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.utils.bench import environment, format_table  # noqa: E402
from aa_detection.utils.memory import measure_peak_memory  # noqa: E402

CONFIGS = ["configs/retinanet_R_50_FPN_1x.yaml", "configs/retinanet_AA_R_50_FPN_1x.yaml"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-files", nargs=2, default=CONFIGS, metavar=("BASELINE", "AA"))
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median and spread)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage costs")
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--profile", action="store_true", help="profile one inference of each model")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for both models")
    return parser.parse_args(argv)


def build(config_file, opts, device):
    cfg = setup_cfg(config_file, [*opts, "MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def random_batch(size, batch, device, num_classes, boxes_per_image=8):
    """`batch` detectron2 inputs of (3, H, W) random images, with random ground-truth boxes."""
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


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def inference_step(model, inputs):
    model.eval()
    with torch.inference_mode():
        model(inputs)


def training_step(model, inputs):
    model.train()
    with EventStorage():
        losses = model(inputs)
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)


def time_alternating(steps, device, warmup, repeats, cores=None):
    """{name: [seconds per run]} for each name -> callable, running the callables in turns. With a dict
    `cores`, also stores there {name: CPU seconds per wall second of its runs}: about the thread count
    when the cores were this process's alone, lower when other processes took them."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    cpu = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            cpu_start, start = time.process_time(), time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - cpu_start
    if cores is not None:
        cores.update({name: cpu[name] / max(sum(times[name]), 1e-9) for name in steps})
    return times


def summary(times, cores_used=None):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times,
            "cores_used": cores_used}


def profile_inference(model, inputs):
    """{op name: self CPU seconds} of one inference."""
    model.eval()
    with torch.inference_mode(), torch.profiler.profile() as prof:
        model(inputs)
    return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


def extra_time_by_op(profile, rows=12):
    """[(op, baseline s, AA s, AA - baseline s)] for the ops that account for most of the AA model's extra time."""
    base, aa = profile["baseline"], profile["aa"]
    ops = sorted(set(base) | set(aa), key=lambda op: -(aa.get(op, 0) - base.get(op, 0)))
    return [(op, base.get(op, 0.0), aa.get(op, 0.0), aa.get(op, 0.0) - base.get(op, 0.0)) for op in ops[:rows]]


def run(args):
    device = args.device
    names = ("baseline", "aa")
    built = {name: build(path, args.opts, device) for name, path in zip(names, args.config_files)}
    models = {name: model for name, (_, model) in built.items()}
    num_classes = built["baseline"][0].MODEL.RETINANET.NUM_CLASSES
    infer_inputs = [{k: v for k, v in x.items() if k != "instances"} for x in random_batch(args.size, 1, device, 1)]
    train_inputs = random_batch(args.size, args.train_batch, device, num_classes)
    results = {"environment": environment(device), "size": args.size, "configs": dict(zip(names, args.config_files))}

    for name, model in models.items():
        model.eval()
        flops, by_op = flop_count(model, infer_inputs)
        results[name] = {
            "params_M": count_parameters(model)["total"] / 1e6,
            "gflops": flops / 1e9,
            "attention_gflops": by_op["attention"] / 1e9,
        }

    measurements = [("inference_s", "inference_peak_GiB", inference_step, infer_inputs)]
    if not args.no_train:
        measurements.append(("train_iter_s", "train_peak_GiB", training_step, train_inputs))
    for time_key, memory_key, step, inputs in measurements:
        cores = {}
        times = time_alternating(
            {n: (lambda m=m: step(m, inputs)) for n, m in models.items()}, device, args.warmup, args.repeats, cores
        )
        for name in names:
            results[name][time_key] = summary(times[name], cores[name])
            results[name][memory_key] = measure_peak_memory(lambda: step(models[name], inputs), device) / 2**30

    if not args.no_stages:
        aa_cfg = built["aa"][0]
        stages = {}
        for stage in aa_cfg.MODEL.AA.STAGES:
            _, model = build(args.config_files[1], [*args.opts, "MODEL.AA.STAGES", [stage]], device)
            pair = {"baseline": models["baseline"], stage: model}
            times = time_alternating(
                {n: (lambda m=m: inference_step(m, infer_inputs)) for n, m in pair.items()}, device, 1, args.repeats
            )
            model.eval()
            stages[stage] = {
                "inference_ratio": statistics.median(times[stage]) / statistics.median(times["baseline"]),
                "gflops_ratio": flop_count(model, infer_inputs)[0] / 1e9 / results["baseline"]["gflops"],
            }
            del model
        results["stages"] = stages

    if args.profile:
        results["profile"] = {n: profile_inference(m, infer_inputs) for n, m in models.items()}
    return results


def report(results):
    base, aa = results["baseline"], results["aa"]
    rows = [
        ("params (M)", "params_M", "{:.2f}"),
        ("GFLOPs", "gflops", "{:.1f}"),
        ("  of which attention", "attention_gflops", "{:.1f}"),
        ("inference s/img", "inference_s", "{:.3f}"),
        ("inference peak GiB", "inference_peak_GiB", "{:.2f}"),
        ("train s/iter", "train_iter_s", "{:.3f}"),
        ("train peak GiB", "train_peak_GiB", "{:.2f}"),
    ]
    table = []
    for label, key, fmt in rows:
        if key not in base:
            continue
        b, a = base[key], aa[key]
        spread = ""
        if isinstance(b, dict):
            spread = f"{b['min']:.3f}-{b['max']:.3f} | {a['min']:.3f}-{a['max']:.3f}"
            b, a = b["median"], a["median"]
        ratio = f"{a / b:.3f}" if b else "-"
        table.append((label, fmt.format(b), fmt.format(a), ratio, spread))
    H, W = results["size"]
    lines = [
        f"{results['configs']['baseline']} vs {results['configs']['aa']} at {H}x{W}",
        environment_line(results["environment"]),
        format_table(("", "baseline", "AA", "AA/baseline", "min-max (baseline | AA)"), table),
    ]
    used = [(label, base[key].get("cores_used"), aa[key].get("cores_used")) for label, key in
            (("inference", "inference_s"), ("training", "train_iter_s")) if isinstance(base.get(key), dict)]
    if used and all(b is not None and a is not None for _, b, a in used):
        lines.append("cores used (CPU s per wall s; the thread count on an idle machine): " + ", ".join(
            f"{label} {b:.2f} | {a:.2f}" for label, b, a in used))
    if "stages" in results:
        stage_rows = [(s, f"{v['inference_ratio']:.3f}", f"{v['gflops_ratio']:.3f}") for s, v in results["stages"].items()]
        lines += ["", "Each augmented stage alone (ratio to the baseline):",
                  format_table(("stage", "inference", "GFLOPs"), stage_rows)]
    if "profile" in results:
        total = {n: sum(ops.values()) for n, ops in results["profile"].items()}
        rows = [(op, f"{b:.3f}", f"{a:.3f}", f"{d:+.3f}") for op, b, a, d in extra_time_by_op(results["profile"])]
        lines += ["", f"Where the AA model's extra inference time goes (torch.profiler, self CPU seconds; "
                  f"total {total['baseline']:.2f} vs {total['aa']:.2f}):",
                  format_table(("op", "baseline", "AA", "AA - baseline"), rows)]
    return "\n".join(lines)


def environment_line(env):
    return ", ".join(f"{k}: {v}" for k, v in env.items())


def main(argv=None):
    args = parse_args(argv)
    results = run(args)
    print(report(results))
    if args.json:
        from aa_detection.safe_io import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    from aa_detection.errors import exit_on_user_error

    with exit_on_user_error():  # a bad config: its message and exit status 2, no traceback
        main()
