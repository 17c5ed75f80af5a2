"""Servers that die with the command that started them.

A child server started in its own session (the S3 server, weed) or by a library
outlives a parent killed with SIGKILL: no ``atexit``, no signal handler runs. A watchdog process, which
holds nothing but the child's pid, notices that the parent is gone (it is re-parented) and kills the
child. The same code works for any child, on Linux and macOS, without changing how it was started.
``process_exists`` is how the holders of claims and slots tell a process of this host that died.
"""

from __future__ import annotations

import os
import subprocess
import sys

WATCH = """
import os, signal, sys, time
parent, children = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
while os.getppid() == parent:
    time.sleep(0.5)
for pid in children:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def kill_with_parent(*pids: int) -> subprocess.Popen:
    """Start the watchdog for ``pids`` (children of this process): when this process ends, however it
    ends, they are killed within a second. A child already stopped in order is left alone by the
    kernel (``kill`` on a pid nobody holds fails quietly)."""
    return subprocess.Popen([sys.executable, "-c", WATCH, str(os.getpid()), *map(str, pids)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive (one that cannot be signalled counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process, say
        pass
    return True
