"""Polling helpers shared by the tests that wait on threads, processes or a Textual app."""

from __future__ import annotations

import time


def wait_for(cond, timeout: float, step: float = 0.02) -> bool:
    """Poll ``cond`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return False


async def pilot_wait_for(pilot, cond, timeout: float, step: float = 0.02) -> None:
    """Let a Textual app run until ``cond`` holds; AssertionError after ``timeout`` seconds."""
    for _ in range(int(timeout / step)):
        if cond():
            return
        await pilot.pause(step)
    raise AssertionError("condition not reached in time")
