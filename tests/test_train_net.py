"""Short real trainings on a tiny synthetic dataset: loss, metrics, --resume, --eval-only, 2 processes."""
import json
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.engine import DefaultTrainer, HookBase, create_ddp_model, launch  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402

from aa_detection.checkpoint import AACheckpointer  # noqa: E402
from aa_detection.engine.compare import read_metrics  # noqa: E402
from aa_detection.engine.trainer import RESULTS_FILE, Trainer, argument_parser, main, setup  # noqa: E402

pytestmark = pytest.mark.slow  # trainings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs/synthetic/retinanet_R_18_FPN_synthetic.yaml")
BOX_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


MASK_AA_CFG = os.path.join(ROOT, "configs/synthetic/mask_rcnn_AA_R_18_FPN_synthetic.yaml")


def _args(data_root, out, *extra, max_iter=40, flags=(), config=CFG):
    opts = [
        "DATASETS.SYNTHETIC.ROOT", data_root, "DATASETS.SYNTHETIC.NUM_TRAIN", "32",
        "DATASETS.SYNTHETIC.NUM_VAL", "6", "INPUT.MIN_SIZE_TRAIN", "(64, 96)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "20", "TEST.EVAL_PERIOD", "0",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "1", "OUTPUT_DIR", str(out),
    ] + list(extra)
    return argument_parser().parse_args(["--config-file", config, *flags, *opts])


def _results(out):
    with open(os.path.join(out, RESULTS_FILE)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(_args(tiny_synthetic, out))
    return out


def test_training_lowers_loss_and_evaluates(trained):
    # metrics.json holds medians over 20-iteration windows: iterations 0-19 against 20-39
    losses = [r["total_loss"] for r in read_metrics(os.path.join(trained, "metrics.json")) if "total_loss" in r]
    assert len(losses) == 2 and losses[1] < 0.9 * losses[0], losses
    res = _results(trained)
    box = res["results"]["synthetic_val"]["bbox"]
    assert BOX_KEYS <= set(box)
    assert res["iteration"] == 40 and res["params"] > 1e6 and res["gflops"] > 0
    assert res["seconds_per_image"] > 0 and 0 < res["train_seconds"] <= res["train_wall_seconds"]
    assert os.path.isfile(os.path.join(trained, "model_final.pth"))


def test_training_without_a_test_dataset_writes_its_results(tiny_synthetic, tmp_path):
    main(_args(tiny_synthetic, tmp_path, "DATASETS.TEST", "()", max_iter=2))
    res = _results(tmp_path)
    assert res["iteration"] == 2 and res["results"] == {} and res["datasets"]["test"] == []
    assert res["params"] > 1e6 and res["gflops"] is None and res["seconds_per_image"] is None


def test_the_evaluator_scores_boxes_by_their_overlap_with_the_ground_truth(tiny_synthetic, tmp_path):
    """pycocotools through the trainer's evaluator on hand-made predictions: the ground truth itself is
    AP 100, with the classes swapped AP 0, shifted right by a fifth of its width (IoU 0.8 / 1.2 = 0.67)
    AP50 100, AP75 0 and AP 40 (4 of the 10 IoU thresholds 0.50:0.95 met)."""
    cfg = setup(_args(tiny_synthetic, tmp_path))
    dataset = DatasetCatalog.get("synthetic_val")
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES

    def evaluate(shift=0.0, class_offset=0):
        evaluator = Trainer.build_evaluator(cfg, "synthetic_val", str(tmp_path / "eval"))
        evaluator.reset()
        for record in dataset:
            boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                                  for a in record["annotations"]], dtype=torch.float32).reshape(-1, 4)
            boxes[:, [0, 2]] += shift * (boxes[:, 2:3] - boxes[:, 0:1])
            instances = Instances((record["height"], record["width"]), pred_boxes=Boxes(boxes),
                                  scores=torch.linspace(1.0, 0.5, len(boxes)),
                                  pred_classes=torch.tensor([(a["category_id"] + class_offset) % num_classes
                                                             for a in record["annotations"]]))
            evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
        return evaluator.evaluate()["bbox"]

    assert evaluate()["AP"] == pytest.approx(100.0)
    assert evaluate(class_offset=1)["AP"] == pytest.approx(0.0)
    shifted = evaluate(shift=0.2)
    assert (shifted["AP50"], shifted["AP75"], shifted["AP"]) == pytest.approx((100.0, 0.0, 40.0))


def test_the_evaluator_scores_the_synthetic_masks(tiny_synthetic, tmp_path):
    """The synthetic Mask R-CNN config's evaluator on the ground truth's own masks (decoded from the JSON's
    RLE) gives mask AP 100; the same masks with every class shifted by one AP 0."""
    from pycocotools import mask as mask_util

    cfg = setup(_args(tiny_synthetic, tmp_path, config=MASK_AA_CFG))
    assert cfg.MODEL.MASK_ON
    dataset = DatasetCatalog.get("synthetic_val")
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES

    def evaluate(class_offset):
        evaluator = Trainer.build_evaluator(cfg, "synthetic_val", str(tmp_path / "eval"))
        evaluator.reset()
        for record in dataset:
            annos = record["annotations"]
            masks = torch.stack([torch.from_numpy(mask_util.decode(
                {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})).bool()
                for a in annos])
            boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                                 dtype=torch.float32)
            instances = Instances((record["height"], record["width"]), pred_boxes=Boxes(boxes), pred_masks=masks,
                                  scores=torch.linspace(1.0, 0.5, len(annos)),
                                  pred_classes=torch.tensor([(a["category_id"] + class_offset) % num_classes
                                                             for a in annos]))
            evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
        return evaluator.evaluate()

    results = evaluate(0)
    assert results["segm"]["AP"] == pytest.approx(100.0) and results["bbox"]["AP"] == pytest.approx(100.0)
    assert evaluate(1)["segm"]["AP"] == pytest.approx(0.0)


def test_synthetic_mask_rcnn_trains_and_evaluates_masks(tiny_synthetic, tmp_path):
    """The synthetic AA Mask R-CNN through tools/train_net.py: its mask loss falls and the evaluation
    gives box and mask metrics (pycocotools) on its predictions (every score kept: after 40 iterations few
    reach the default 0.05), which compare_runs shows."""
    import math

    from aa_detection.engine.compare import format_table, load_run

    main(_args(tiny_synthetic, tmp_path, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", max_iter=40, config=MASK_AA_CFG))
    losses = [r["loss_mask"] for r in read_metrics(os.path.join(tmp_path, "metrics.json")) if "loss_mask" in r]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    res = _results(tmp_path)["results"]["synthetic_val"]
    assert BOX_KEYS <= set(res["bbox"]) and BOX_KEYS <= set(res["segm"])
    assert math.isfinite(res["segm"]["AP"]) and 0 <= res["segm"]["AP"] <= 100
    row = next(line for line in format_table([load_run(str(tmp_path))]).splitlines() if line.startswith("| mask AP "))
    assert f"| {res['segm']['AP']:.1f} " in row


def test_eval_only_reproduces_metrics(trained, tiny_synthetic, tmp_path):
    weights = os.path.join(trained, "model_final.pth")
    main(_args(tiny_synthetic, tmp_path, "MODEL.WEIGHTS", weights, flags=["--eval-only"]))
    again, first = _results(tmp_path), _results(trained)
    assert again["iteration"] == first["iteration"]
    a, b = again["results"]["synthetic_val"]["bbox"], first["results"]["synthetic_val"]["bbox"]
    for k in BOX_KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k


class _Interrupt(Exception):
    pass


class _InterruptAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise _Interrupt()


def test_resume_continues_from_last_checkpoint(tiny_synthetic, tmp_path):
    args = _args(tiny_synthetic, tmp_path, max_iter=30, flags=["--resume"])
    trainer = Trainer(setup(args))
    trainer.resume_or_load(resume=True)
    trainer.register_hooks([_InterruptAt(24)])
    with pytest.raises(_Interrupt):
        trainer.train()
    with open(os.path.join(tmp_path, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000019.pth"
    saved = torch.load(os.path.join(tmp_path, "model_0000019.pth"), map_location="cpu", weights_only=False)

    resumed = Trainer(setup(args))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 20
    state = resumed.model.state_dict()
    assert set(state) == set(saved["model"])
    for k, v in saved["model"].items():
        assert torch.equal(state[k], torch.as_tensor(v)), k
    assert resumed.scheduler.last_epoch == 20  # the learning-rate schedule resumes too
    resumed.train()
    assert resumed.iter == 30
    assert os.path.isfile(os.path.join(tmp_path, "model_final.pth"))


def test_two_processes_on_cpu(tiny_synthetic, tmp_path):
    args = _args(tiny_synthetic, tmp_path, max_iter=6, flags=["--num-gpus", "2"])
    args.dist_url = "auto"
    launch(main, args.num_gpus, num_machines=1, machine_rank=0, dist_url="auto", args=(args,))
    res = _results(tmp_path)
    assert res["iteration"] == 6
    assert BOX_KEYS <= set(res["results"]["synthetic_val"]["bbox"])
    with open(os.path.join(tmp_path, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"


def _wrap_a_cpu_module_as_detectron2_does():
    with pytest.raises(ValueError, match="device_ids"):
        create_ddp_model(torch.nn.Linear(2, 2), broadcast_buffers=False)


def test_detectron2_still_passes_device_ids_for_cpu_models():
    # Trainer.__init__ is overridden for this alone (and the checkpointer): once this fails, detectron2
    # wraps CPU models itself and DefaultTrainer.__init__ can be used again.
    launch(_wrap_a_cpu_module_as_detectron2_does, 2, num_machines=1, machine_rank=0, dist_url="auto")


def test_trainer_sets_what_default_trainer_sets(tiny_synthetic, tmp_path):
    upstream = DefaultTrainer(setup(_args(tiny_synthetic, tmp_path / "upstream")))
    ours = Trainer(setup(_args(tiny_synthetic, tmp_path / "ours")))
    assert set(vars(upstream)) <= set(vars(ours))
    assert isinstance(ours.checkpointer, AACheckpointer) and ours.checkpointer.save_dir == str(tmp_path / "ours")
    assert ours.eval_results is None and ours.eval_seconds == 0.0
    assert ours.metrics_writer.json_file == os.path.join(str(tmp_path / "ours"), "metrics.json")
