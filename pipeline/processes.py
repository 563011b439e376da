"""Which process does what: this host, whether a pid still runs, this command line.

MLflow runs, sweep trials and example locks record their process's pid and host, so that a later
command can tell a holder that died from one that is still working.
"""

import shlex
import socket
import sys
from pathlib import Path

import psutil


def this_host() -> str:
    return socket.gethostname()


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: it exists
        return True


def gone_here(host: str | None, pid: int | str | None) -> bool:
    """Whether process `pid` of `host` is proven gone: it ran on this host and runs no more. A
    process of another host, or one without a pid, is never taken for gone."""
    return host == this_host() and pid is not None and not pid_running(int(pid))


def command_line() -> str:
    """This process's command line as it was typed: `python -m pipeline train --example toy`."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = Path(argv[0]).name  # python, not /home/me/project/.venv/bin/python
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."
