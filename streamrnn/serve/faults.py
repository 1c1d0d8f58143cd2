"""Fault injection for the durability tests: crash or fail at a named point, on cue.

    STREAMRNN_CRASH_AT=wal_fsync:3      SIGKILL this process the 3rd time it reaches
                                        the point (an instant a random kill rarely hits)
    STREAMRNN_FAIL_AT=checkpoint_write:1  raise ENOSPC from the 1st time on (disk full)
    STREAMRNN_FAIL_AT=wal_write:5-40    the 5th to the 40th time (then there is room)
    STREAMRNN_HANG_AT=turn:50           the main loop stops forever on its 50th turn
    STREAMRNN_SLOW_AT=replay_step:1     20 ms more at each hit, from the 1st on (a long
                                        replay, to stop in the middle of)
    STREAMRNN_NAN_AT=update:3           the 3rd update's loss is NaN (its head outputs
                                        are), as an overflowing model's would be
    STREAMRNN_CRASH_AT=global_step:9@1  only rank 1 of a cluster, only before its first
                                        restart (torchrun's restarts set the same cues)

Points: wal_write, wal_rotate, wal_fsync (crash or fail), checkpoint_write, turn,
request_<type>, update (NaN), global_step (crash: the ranks agreed on an update, this
one has not logged it yet), replay_step (slow). Unset (always, outside tests), each check is one
dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal
import time

_hits: dict[str, int] = {}


def _cue(variable: str) -> tuple[str, int] | None:
    value = os.environ.get(variable)
    if not value:
        return None
    value, _, rank = value.partition("@")
    if rank and (os.environ.get("RANK") != rank or
                 os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return None
    point, _, count = value.partition(":")
    first, _, last = count.partition("-")
    return point, int(first or 1), int(last) if last else None


def _reached(variable: str, point: str) -> bool:
    cue = _cue(variable)
    if cue is None or cue[0] != point:
        return False
    _hits[variable + point] = _hits.get(variable + point, 0) + 1
    hits, first, last = _hits[variable + point], cue[1], cue[2]
    return hits >= first and (last is None or hits <= last)


def maybe_crash(point: str) -> None:
    if _reached("STREAMRNN_CRASH_AT", point):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail(point: str) -> None:
    if _reached("STREAMRNN_FAIL_AT", point):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")


def maybe_slow(point: str) -> None:
    if _reached("STREAMRNN_SLOW_AT", point):
        time.sleep(0.02)


def maybe_hang(point: str) -> None:
    if _reached("STREAMRNN_HANG_AT", point):
        while True:
            time.sleep(3600)


def poison(learner) -> None:
    """STREAMRNN_NAN_AT=update:N: the Nth training forward pass of the head (counted from
    this process's start, replays included) gives NaN logits."""
    if _cue("STREAMRNN_NAN_AT") is None:
        return
    import torch

    def hook(module, inputs, output):
        if torch.is_grad_enabled() and _reached("STREAMRNN_NAN_AT", "update") and \
                _hits["STREAMRNN_NAN_ATupdate"] == _cue("STREAMRNN_NAN_AT")[1]:
            return output * float("nan")
        return output
    learner.model.head.register_forward_hook(hook)
