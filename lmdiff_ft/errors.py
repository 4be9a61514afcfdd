"""The one exception type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A bad input (path, file, field, value). The message names it and says what was expected."""


def first_line(exc: Exception) -> str:
    """Another library's error, shortened to what a one-line message can carry."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class TrainingStopped(Exception):
    """Training stopped at a step boundary on SIGTERM/SIGINT, after writing a complete checkpoint: `--resume` continues
    it. The CLI exits with the shell's code for that signal (143, 130), so that schedulers see a preempted run."""

    def __init__(self, step: int, signal_name: str, exit_code: int):
        super().__init__(f"stopped at step {step} by {signal_name}")
        self.step = step
        self.signal_name = signal_name
        self.exit_code = exit_code
