"""The AA-ResNet-18 RetinaNet trains one step and infers on extreme inputs: tiny images (smaller than
P7's stride 128), 1xN and Nx1 feature maps, batches mixing sizes, hundreds of boxes.

Training batch norm needs more than one value per channel: an image of 32x32 or less is padded to 32x32,
whose res5 map is 1x1, so such images train in batches of two or more (inference takes them alone).
The training data path resizes every image to INPUT.MIN_SIZE_TRAIN first (see the last test)."""
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AA_CFG = os.path.join(ROOT, "configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml")


@pytest.fixture(scope="module")
def model():
    cfg = setup_cfg(AA_CFG, ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.RETINANET.NUM_CLASSES", "3",
                             "MODEL.RETINANET.NUM_CONVS", "1",
                             "INPUT.MAX_SIZE_TRAIN", "128"])
    torch.manual_seed(0)
    m = build_model(cfg)
    assert any(isinstance(x, AAConv2d) for x in m.modules())
    return m


def _sample(h, w, num_boxes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = (torch.rand(num_boxes, 2, generator=g) * 0.5 + 0.1) * torch.tensor([w, h])
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], dim=1)
    inst = Instances((h, w), gt_boxes=Boxes(boxes),
                     gt_classes=torch.randint(0, 3, (num_boxes,), generator=g))
    return {"image": image, "instances": inst, "height": h, "width": w}


def _train_step_and_infer(model, batch):
    model.train()
    model.zero_grad()
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": d["image"], "height": d["height"], "width": d["width"]} for d in batch])
    assert len(outputs) == len(batch)
    for out, d in zip(outputs, batch):
        inst = out["instances"]
        assert inst.image_size == (d["height"], d["width"])
        assert torch.isfinite(inst.pred_boxes.tensor).all()


@pytest.mark.parametrize("h, w", [(20, 20), (8, 8)], ids=["20x20", "8x8"])
def test_images_smaller_than_the_largest_stride(model, h, w):
    _train_step_and_infer(model, [_sample(h, w, seed=1), _sample(h, w, seed=2)])
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": _sample(h, w)["image"], "height": h, "width": w}])
    assert out["instances"].image_size == (h, w)


@pytest.mark.parametrize("h, w", [(32, 640), (640, 32)], ids=["32x640_res5_1xN", "640x32_res5_Nx1"])
def test_elongated_images(model, h, w):
    _train_step_and_infer(model, [_sample(h, w)])


def test_batch_mixing_sizes(model):
    _train_step_and_infer(model, [_sample(20, 20, seed=1), _sample(32, 200, seed=2), _sample(96, 64, seed=3),
                                  _sample(160, 40, seed=4)])


def test_hundreds_of_boxes(model):
    _train_step_and_infer(model, [_sample(128, 128, num_boxes=300, seed=5), _sample(64, 96, num_boxes=1, seed=6)])


def test_image_without_boxes_in_a_batch(model):
    _train_step_and_infer(model, [_sample(64, 64, num_boxes=0, seed=7), _sample(64, 64, seed=8)])


def test_tiny_image_through_the_training_data_path(model, tmp_path):
    import json

    import numpy as np
    from detectron2.data import DatasetCatalog, DatasetMapper
    from PIL import Image

    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img / "tiny.png")
    Image.fromarray(np.zeros((16, 600, 3), np.uint8)).save(img / "long.png")
    data = {"images": [{"id": 1, "file_name": "tiny.png", "width": 20, "height": 20},
                       {"id": 2, "file_name": "long.png", "width": 600, "height": 16}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0},
                            {"id": 2, "image_id": 2, "bbox": [2, 2, 100, 10], "category_id": 1, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    cfg = setup_cfg(AA_CFG, ["DATASETS.TRAIN", "('tiny_path',)", "DATASETS.TEST", "()",
                             "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128"],
                    datasets=[("tiny_path", str(tmp_path / "d.json"), str(img))])
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("tiny_path")]
    assert tuple(batch[0]["image"].shape[1:]) == (64, 64)  # resized up to MIN_SIZE_TRAIN
    assert batch[1]["image"].shape[1] <= 64 and batch[1]["image"].shape[2] <= 128  # MAX_SIZE_TRAIN caps it
    for d in batch:
        d["height"], d["width"] = d["image"].shape[1:]
    _train_step_and_infer(model, batch)
