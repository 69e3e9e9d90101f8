"""Process lifetimes: an engine ends with the process that started it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2)


def parent_death_signal(signum: int) -> None:
    """Have the kernel send this process ``signum`` when its parent dies (Linux; elsewhere nothing).

    Used before vLLM starts in a replica's server (it ends with its Ray Serve replica) and in vLLM's
    engine-core process (it ends with its server, ``die_with_server``).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def die_with_server() -> None:
    """In vLLM's engine-core process: end it when the process that started it (the API server) dies.

    vLLM does not watch for that, so a killed server would leave its engine core, and the KV cache
    it holds, behind. If the server is already gone (the core was handed to init), exit now.
    """
    parent_death_signal(signal.SIGKILL)
    if sys.platform.startswith("linux") and os.getppid() == 1:
        os._exit(1)
