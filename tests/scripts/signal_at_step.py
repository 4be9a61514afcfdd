"""`lmdiff-ft` that signals itself during training, at a fixed point (an outside signal races a tiny run):

    python tests/scripts/signal_at_step.py STEP SIGNAL RANKS [AGAIN] -- sft TASK [overrides]

sends SIGNAL (TERM or INT) to this process during the optimizer step after step STEP, on the ranks listed
(comma-separated, e.g. 0 or 0,1), as a scheduler would. With AGAIN, the process signals itself once more while it
writes the checkpoint that the first signal asked for, after the launcher-copy window: a second signal that stops at
once.
"""

import os
import signal
import sys
import time

import torch
from accelerate.utils import get_int_from_env
from transformers import Trainer

from lmdiff_ft.cli import main
from lmdiff_ft.recipes.preemption import REPEAT_WINDOW_S

step, name, ranks, *again = sys.argv[1 : sys.argv.index("--")]
signum = getattr(signal, f"SIG{name}")
rank = get_int_from_env(["RANK"], 0)
training_step, save = Trainer.training_step, torch.save
signalled = False


def signalling_step(self, *args, **kwargs):
    global signalled
    if self.state.global_step == int(step) and str(rank) in ranks.split(","):
        signalled = True
        os.kill(os.getpid(), signum)
    return training_step(self, *args, **kwargs)


def save_signalled_again(obj, path, *args, **kwargs):
    if signalled and str(path).endswith("optimizer.pt"):
        time.sleep(REPEAT_WINDOW_S + 0.2)
        os.kill(os.getpid(), signum)
    return save(obj, path, *args, **kwargs)


Trainer.training_step = signalling_step
if again:
    torch.save = save_signalled_again
sys.exit(main(sys.argv[sys.argv.index("--") + 1 :]))
