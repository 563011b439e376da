"""The error types the command line turns into a clean message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix: bad parameters, a missing or broken file, a bad prompt."""


class Diverged(PipelineError):
    """The training loss became NaN or infinite; `step` is the step where it did."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command (after saving what it could). Exit status 128 + `signum`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
