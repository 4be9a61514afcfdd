"""SIGTERM and SIGINT during training: finish the optimizer step, write a checkpoint, stop, and say how to continue.

Schedulers that take a machine away (SLURM at its time limit, Kubernetes evicting a pod, a spot VM being reclaimed)
send SIGTERM and wait a grace period before SIGKILL. Here the signal only sets a flag; at the end of the optimizer step
a callback asks the Trainer to save and stop, so the checkpoint is the Trainer's own (model, optimizer, scheduler, RNG
and trainer state) and `--resume` continues exactly. Under `accelerate launch` the flag is all-reduced every step, so
all ranks stop at the same step even when only one was signalled.

A second signal acts as it would without us (SIGTERM ends the process, SIGINT raises KeyboardInterrupt) unless it comes
within `REPEAT_WINDOW_S` of the first: launchers (torchrun, hence `accelerate launch`) forward the signal that SLURM or
a terminal has already sent to every process, and that copy must not cut the checkpoint short.
"""

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..errors import TrainingStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0  # a second signal sooner than this is the launcher's copy of the first


class StopOnSignal(TrainerCallback):
    """Turns SIGTERM/SIGINT into "save and stop at the end of this optimizer step"."""

    def __init__(self):
        self.received: int = 0  # the signal's number, 0 for none
        self.received_at = 0.0
        self.stopped_by: int = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Signal handlers can only be set in the main thread; elsewhere signals keep their usual effect."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if not self.received:
            self.received, self.received_at = signum, time.monotonic()
        elif time.monotonic() - self.received_at > REPEAT_WINDOW_S:
            self.restore()
            signal.raise_signal(signum)  # the usual effect, at once

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.received
        if dist.is_available() and dist.is_initialized():  # every rank stops at the same step
            flag = torch.tensor([signum], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.stopped_by = signum
            control.should_save = control.should_training_stop = control.should_log = True
        return control


@contextmanager
def stop_on_signal(trainer) -> Iterator[None]:
    """Around `trainer.train()`: SIGTERM/SIGINT save and stop at the step's end, then raise `TrainingStopped`."""
    callback = StopOnSignal()
    trainer.add_callback(callback)
    callback.install()
    try:
        yield
    finally:
        callback.restore()
        trainer.remove_callback(callback)
    if callback.stopped_by:
        signum = signal.Signals(callback.stopped_by)
        raise TrainingStopped(trainer.state.global_step, signum.name, 128 + signum.value)
