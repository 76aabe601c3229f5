"""``python -m vllm_medusa.serve_child PARENT_PID -- API_SERVER_FLAGS...``.

vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``) run by a Ray Serve replica,
with a watchdog: when the replica that started it is gone (its process killed by Ray, by the
OOM killer or by a test), the server's whole process group (API server + engine core) is
killed, so a dead replica never leaves an engine holding cores and KV cache. ``PR_SET_PDEATHSIG``
would not do: it fires when the *thread* that forked exits, and Ray Serve runs replica code on
threads it may retire.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

WATCH_PERIOD_S = 0.5


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_PERIOD_S)
        if os.getppid() != parent_pid:
            # Our process group: the replica started us with start_new_session=True.
            os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] != "--":
        sys.exit("usage: python -m vllm_medusa.serve_child PARENT_PID -- API_SERVER_FLAGS...")
    parent_pid = int(argv[0])
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    sys.argv = ["vllm.entrypoints.openai.api_server", *argv[2:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
