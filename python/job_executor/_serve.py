"""The loop of a Python handler thread.

The engine hands each step of a Python handler to one of these daemon
threads: the handler's code runs on a thread Python created, with no Rust
frame beneath it, so that a handler which never returns is an abandoned
daemon thread like any other, which the interpreter stops at exit. A thread
waits for its next call in ``os.read`` on a pipe the engine writes one byte
to per call.
"""

from __future__ import annotations

import os
from typing import Any


def serve(doorbell: int, slot: Any) -> None:
    try:
        while os.read(doorbell, 1):
            call = slot.take()
            if call is not None:
                handler, step, context, pending = call
                # Whatever the handler raises, even an interrupt, is its
                # step's failure: the engine must never wait for nothing.
                try:
                    returned = handler(step, context)
                except BaseException as raised:  # noqa: BLE001
                    pending.raised(raised)
                else:
                    pending.returned(returned)
                del call, handler, step, context, pending
            slot.idle()
    finally:
        os.close(doorbell)
