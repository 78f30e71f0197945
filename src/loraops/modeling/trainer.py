"""The trainer loraops trains with, at module level so it can be imported and subclassed: the answer-only loss
(logits only where the loss counts, :mod:`loraops.modeling.packing`) and the callbacks of a train stage (a line of
progress per logging step, the deterministic fault injection the crash tests use, a sweep trial's pruning)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from loraops.core.errors import ConfigError
from loraops.core.utils import say
from loraops.modeling import packing

FAULT_ENV = "LORAOPS_FAULT_AFTER_CHECKPOINT"
"""Fault injection for crash tests, read by the train stage: ``N:kill`` SIGKILLs the stage's whole process group
(the run, `dvc repro` and the stage: a machine dying) right after checkpoint N is written; ``N:wait:PATH`` pauses
there until PATH exists, after creating PATH.waiting (a server can be stopped while the run is mid-training).
Unset in normal use."""


class AnswerOnlyTrainer(Trainer):
    """A Trainer whose loss covers the answer tokens only, computing logits only there."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss, outputs = packing.answer_only_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss


class LineProgress(TrainerCallback):
    """A line per logging step (step, loss, learning rate) and per evaluation, for logs that are not terminals."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        shown = [f"{key} {logs[key]:.4g}" for key in ("loss", "eval_loss", "learning_rate", "grad_norm") if key in logs]
        if shown:
            say(f"train step {state.global_step}/{state.max_steps}: " + ", ".join(shown))


class Fault(TrainerCallback):
    """Right after checkpoint ``step``: SIGKILL the process group (``kill``) or wait for a file (``wait:PATH``)."""

    def __init__(self, step: int, action: str) -> None:
        self.step, self.action = step, action

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.step:
            return
        say(f"{FAULT_ENV}: checkpoint-{self.step} written; {self.action}")
        if self.action == "kill":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        flag = Path(self.action.removeprefix("wait:"))
        flag.with_name(flag.name + ".waiting").touch()  # the test sees the stage paused, then acts
        while not flag.exists():
            time.sleep(0.1)


def fault_injection() -> Fault | None:
    """The callback that carries out ``LORAOPS_FAULT_AFTER_CHECKPOINT``, or None when it is unset."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    step, _, action = spec.partition(":")
    if not step.isdigit() or not (action == "kill" or action.startswith("wait:")):
        raise ConfigError(f"{FAULT_ENV}={spec!r}: expected N:kill or N:wait:PATH")
    return Fault(int(step), action)


class TrialPruning(TrainerCallback):
    """Each evaluation's loss goes to the sweep trial; training stops when the trial is pruned."""

    def __init__(self, reporter: Any) -> None:
        self.reporter = reporter

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if self.reporter.report((metrics or {}).get("eval_loss"), state.global_step):
            control.should_training_stop = True
