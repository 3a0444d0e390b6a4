"""R-18 RetinaNet on the synthetic shapes: the LazyConfig twin of configs/synthetic/retinanet_R_18_FPN_synthetic.yaml
(the same model, data, optimizer and schedule), built on detectron2's common/models/retinanet.py.

    python tools/train_net.py --config-file configs/lazy/retinanet_R_18_FPN_synthetic.py train.seed=1
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from aa_detection.solver import adamw

model = get_config("common/models/retinanet.py").model
bottom_up = model.backbone.bottom_up
bottom_up.stem.norm = bottom_up.stages.norm = "BN"  # from scratch: trainable batch norm, nothing frozen
bottom_up.stages.depth = 18
del bottom_up.stages.stride_in_1x1  # basic blocks have no 1x1 convolution
bottom_up.freeze_at = 0
model.backbone.out_channels = 64
model.backbone.norm = "GN"
model.backbone.top_block.in_channels = 512  # res5 of R-18
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64]
model.head.norm = "GN"
# Objects span about 8 to 128 pixels: P3-P7 anchors start at 12, three scales per octave (x, x * 2^(1/3),
# x * 2^(2/3), written as the YAML twin writes them).
model.anchor_generator.sizes = [[12, 15.1191, 19.0488], [24, 30.2381, 38.0976], [48, 60.4762, 76.1953],
                                [96, 120.9524, 152.3906], [192, 241.9048, 304.7812]]
model.smooth_l1_beta = 0.0
model.pixel_std = [57.375, 57.120, 58.395]  # no pretrained weights: unit-variance inputs
model.num_classes = 5

# The project's DATASETS keys (SYNTHETIC, REGISTER, image checks); ROOT "": $DETECTRON2_DATASETS/synthetic.
datasets = dict(SYNTHETIC=dict(ROOT=""))
dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "synthetic_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128, 144, 160, 176), sample_style="choice", max_size=256),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.use_instance_mask = False
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "synthetic_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=160, max_size=256)]
dataloader.test.num_workers = 1

optimizer = L(adamw)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.001,
    weight_decay=0.0001,
    clip_gradients={"CLIP_TYPE": "norm", "CLIP_VALUE": 2.0},  # per parameter tensor
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[640, 740, 800]),
    warmup_length=100 / 800,
    warmup_factor=0.001,
)

train = get_config("common/train.py").train
train.max_iter = 800
train.eval_period = 200  # four evaluations per run: the AP curve
train.checkpointer.period = 200
train.device = "cpu"
train.output_dir = "output/lazy/retinanet_R_18_FPN_synthetic"
