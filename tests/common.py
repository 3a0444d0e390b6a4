"""Helpers shared by the tests (fixtures are in conftest.py)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
# The small generated synthetic dataset of the `tiny_synthetic` fixture.
TINY_SYNTHETIC = {"num_train": 32, "num_val": 6, "image_size": (64, 96)}


def load_tool(name: str):
    """tools/<name>.py as a module, to call its main() as the command line would."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imagenet_like_frozen_bn(model, images, seed=0):
    """Give every FrozenBN of `model` statistics like pretrained weights have: running mean and variance of
    its input on `images` (one forward pass, each norm measured in turn), scales drawn in [0.2, 1] and
    biases of both signs (std 0.5)."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)

    def calibrate(norm, inputs):
        x = inputs[0].detach()
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 0.8 + 0.2)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.5)

    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [n.register_forward_pre_hook(calibrate) for n in norms]
    with torch.no_grad():
        model.backbone(model.preprocess_image(images).tensor)
    for h in handles:
        h.remove()
    return len(norms)
