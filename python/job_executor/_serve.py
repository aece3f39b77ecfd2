"""The loop of a Python handler thread.

Each engine thread that runs Python handlers is paired with one daemon
thread running ``serve``: the handler's Python code runs here, on a thread
Python created, with no Rust frame beneath it, so that a handler which never
returns is an abandoned daemon thread like any other, which the interpreter
stops at exit. The thread waits for work in ``os.read`` on a pipe the engine
thread writes one byte to per call; the pipe's closing ends it.
"""

from __future__ import annotations

import os
from typing import Any


def serve(doorbell: int, calls: Any) -> None:
    try:
        while os.read(doorbell, 1):
            call = calls.take()
            if call is None:  # the call could not be converted; already answered
                continue
            handler, step, context, pending = call
            # Whatever the handler raises, even an interrupt, is its step's
            # failure: the engine thread must never wait for nothing.
            try:
                returned = handler(step, context)
            except BaseException as raised:  # noqa: BLE001
                pending.raised(raised)
            else:
                pending.returned(returned)
            del call, handler, step, context, pending
    finally:
        os.close(doorbell)
