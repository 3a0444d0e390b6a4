"""A training hook that reports whether the attention is used (`aa_detection.modeling.liveness`)."""
import logging
from typing import Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..modeling.liveness import AttentionProbe, dead_layers_message, liveness_scalars

__all__ = ["AttentionLivenessHook"]

logger = logging.getLogger("aa_detection")


class AttentionLivenessHook(HookBase):
    """Measures the attention channels' liveness over the first training step and over the step before
    each evaluation (every `eval_period` iterations, and the last), and puts per stage
    `attention/<stage>/alive` (share of channels alive) and `attention/<stage>/attention_to_conv` (output
    RMS of the attention branch over the convolution branch's) in the event storage, so metrics.json has
    them. A warning names every layer with dead attention channels. Models without AAConv2d are skipped."""

    def __init__(self, eval_period: int):
        self.eval_period = eval_period
        self._probe: Optional[AttentionProbe] = None

    def _measures(self, iteration: int) -> bool:
        next_iter = iteration + 1
        return (iteration == self.trainer.start_iter or next_iter == self.trainer.max_iter
                or (self.eval_period > 0 and next_iter % self.eval_period == 0))

    def before_step(self) -> None:
        if self._measures(self.trainer.iter):
            probe = AttentionProbe(self.trainer.model)
            if probe.layers:
                self._probe = probe.__enter__()

    def after_train(self) -> None:
        if self._probe is not None:  # a step that raised
            self._probe.__exit__(None, None, None)
            self._probe = None

    def after_step(self) -> None:
        if self._probe is None:
            return
        probe, self._probe = self._probe, None
        probe.__exit__(None, None, None)
        report = probe.report()
        self.trainer.storage.put_scalars(**liveness_scalars(report), smoothing_hint=False)
        message = dead_layers_message(report)
        if message and comm.is_main_process():
            logger.warning("Iteration %d: %s", self.trainer.iter, message)
