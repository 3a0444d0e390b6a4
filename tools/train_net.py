#!/usr/bin/env python
"""Train or evaluate RetinaNet with a ResNet or AA-ResNet backbone, the detectron2 way.

    python tools/train_net.py --config-file configs/synthetic/retinanet_R_18_FPN_synthetic.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS OUT/model_final.pth
    python tools/train_net.py --config-file CFG --resume
    python tools/train_net.py --config-file CFG --num-gpus 8 SOLVER.IMS_PER_BATCH 16 SOLVER.BASE_LR 0.01
    python tools/train_net.py --config-file CFG --dataset mine_train train.json images/ \
        --dataset mine_val val.json images/ DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)'
    python tools/train_net.py --config-file configs/lazy/retinanet_AA_R_18_FPN_synthetic.py train.seed=1
"""
from aa_detection.engine.trainer import argument_parser, launch_main
from aa_detection.errors import exit_on_user_error

if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    with exit_on_user_error():  # a bad config, dataset or file, or a diverged loss: one message, exit 2
        launch_main(args)
