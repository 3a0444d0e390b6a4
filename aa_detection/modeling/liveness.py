"""Is the attention used? Liveness of the attention channels of every AAConv2d in a model.

An attention channel is alive when, over one training step, it carries a signal and learns: its output
(after the layer's norm) varies over the batch and the pixels, and its row of the output projection
`attn_out` gets a nonzero gradient. A channel whose norm maps it to a constant, or whose output a
following ReLU always zeroes, fails one of the two and never trains.

    probe = AttentionProbe(model)
    with probe:
        loss = sum(model(batch).values())
    loss.backward()
    report = probe.report()  # {layer name: LayerLiveness}

`stage_summary(report)` gives, per stage (res3, ...), the share of attention channels alive and the
mean ratio of the attention branch's output RMS to the convolution branch's; `liveness_scalars(report)`
the same as the flat `attention/<stage>/<name>` values that metrics.json and metrics.jsonl record.
"""
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

from ..layers import AAConv2d

__all__ = ["AttentionProbe", "LayerLiveness", "stage_summary", "liveness_scalars", "dead_layers_message"]


@dataclass
class LayerLiveness:
    """One AAConv2d: `alive` of `channels` attention channels alive; `attention_to_conv`, the RMS of
    its attention channels' output over the RMS of its convolution channels' output."""

    channels: int
    alive: int
    attention_to_conv: float

    @property
    def share_alive(self) -> float:
        return self.alive / self.channels


class AttentionProbe:
    """Context manager recording, for each AAConv2d of `model`, the per-channel output variance and the
    branches' RMS of the forward passes run inside it (the last pass counts); `report()` combines them
    with the gradients of `attn_out` left by the backward pass that followed."""

    def __init__(self, model: nn.Module):
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, AAConv2d)}
        self._outputs: Dict[str, tuple] = {}
        self._handles: List = []

    def __enter__(self) -> "AttentionProbe":
        self._outputs.clear()
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, name: str):
        def record(layer: AAConv2d, inputs, output: torch.Tensor) -> None:
            out = output.detach().float()
            dv = layer.value_depth
            conv, attn = out[:, :-dv], out[:, -dv:]
            variance = attn.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)  # (dv,)
            rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
            self._outputs[name] = (variance, rms(attn) / max(rms(conv), 1e-12))
        return record

    def report(self) -> Dict[str, LayerLiveness]:
        """{layer name: LayerLiveness} of the layers the recorded forward pass ran; a layer whose
        `attn_out` got no gradient at all (no backward ran) counts its channels dead."""
        result = {}
        for name, (variance, ratio) in self._outputs.items():
            grad = self.layers[name].attn_out.weight.grad
            learns = (torch.zeros_like(variance, dtype=torch.bool) if grad is None
                      else grad.detach().flatten(1).abs().sum(dim=1).cpu() > 0)
            alive = learns & (variance.cpu() > 0)
            result[name] = LayerLiveness(channels=int(alive.numel()), alive=int(alive.sum()), attention_to_conv=ratio)
        return result


def _stage(name: str) -> str:
    """The stage a layer name belongs to ("backbone.bottom_up.res3.0.conv2" -> "res3")."""
    return next((part for part in name.split(".") if part.startswith("res")), name)


def stage_summary(report: Dict[str, LayerLiveness]) -> Dict[str, Dict[str, float]]:
    """{stage: {"alive": share of its attention channels alive, "attention_to_conv": mean ratio}}."""
    stages: Dict[str, List[LayerLiveness]] = {}
    for name, layer in report.items():
        stages.setdefault(_stage(name), []).append(layer)
    return {
        stage: {"alive": sum(l.alive for l in layers) / sum(l.channels for l in layers),
                "attention_to_conv": sum(l.attention_to_conv for l in layers) / len(layers)}
        for stage, layers in sorted(stages.items())
    }


def liveness_scalars(report: Dict[str, LayerLiveness]) -> Dict[str, float]:
    """{"attention/<stage>/alive": ..., "attention/<stage>/attention_to_conv": ...} of `stage_summary`."""
    return {f"attention/{stage}/{key}": value
            for stage, values in stage_summary(report).items() for key, value in values.items()}


def dead_layers_message(report: Dict[str, LayerLiveness]) -> str:
    """"" when every attention channel is alive, else a line naming each layer with dead channels."""
    dead = [f"{name} ({layer.channels - layer.alive} of {layer.channels} channels)"
            for name, layer in report.items() if layer.alive < layer.channels]
    if not dead:
        return ""
    return ("attention channels that are dead (constant output or no gradient; they never train): "
            + ", ".join(dead))
