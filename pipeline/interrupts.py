"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) end a command cleanly: checkpoint, mark KILLED, exit.

Python's own Ctrl-C raises KeyboardInterrupt wherever the program happens to be, halfway
through an optimizer step or an MLflow write; SIGTERM, by default, ends it with no clean-up at
all, leaving its MLflow run RUNNING for ever. Inside `stop_on_signals()` both only ask the
training loop to stop at its next step boundary, where the state is whole; a second signal stops
at once.
"""

import contextlib
import signal
import threading

from pipeline.errors import Stopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stopped(signum: int) -> Stopped:
    return Stopped(f"stopped by {signal.Signals(signum).name}", signum)


class StopRequest:
    """Called between training steps: the Stopped exception to raise, or None to go on."""

    def __init__(self, at_once: bool):
        self.at_once, self.signum = at_once, None

    def __call__(self) -> Stopped | None:
        return None if self.signum is None else stopped(self.signum)

    def handle(self, signum: int, frame) -> None:
        if self.at_once or self.signum is not None:
            raise stopped(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(at_once: bool = False):
    """SIGINT and SIGTERM raise Stopped: at once if `at_once`, else where the training loop asks.

    Signals reach the main thread only; elsewhere (a sweep's worker thread) nothing changes.
    """
    request = StopRequest(at_once)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
