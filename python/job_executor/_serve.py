"""The loop of a Python handler thread.

The engine hands each step of a Python handler — or a whole job to drive,
calling its handlers itself — to one of these daemon threads: the
handler's code runs on a thread Python created, with no Rust frame beneath
it, so that a handler which never returns is an abandoned
daemon thread like any other, which the interpreter stops at exit. A thread
waits for its next call in ``os.read`` on a pipe the engine writes one byte
to per call.
"""

from __future__ import annotations

import os
from typing import Any


def drive(job: Any) -> None:
    """Drives a job handed to this thread: the engine, suspended at each
    call of a Python handler, is resumed with what the handler returned or
    raised."""
    call = job.start()
    while call is not None:
        handler, step, context = call
        del call
        try:
            returned = handler(step, context)
        except BaseException as raised:  # noqa: BLE001
            call = job.raised(raised)
        else:
            call = job.returned(returned)


def serve(doorbell: int, slot: Any) -> None:
    try:
        while os.read(doorbell, 1):
            call = slot.take()
            if call is not None and not isinstance(call, tuple):
                drive(call)
                del call
            elif call is not None:
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
