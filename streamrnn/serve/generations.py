"""generate requests in progress: a slice of each per turn of the loop, so a long one
never holds acks, training or the watchdog's pings (core/generation.py says how the
tokens stay those of one model).

A producer that hears nothing within its reply timeout asks again with the same id;
the request it repeats is recognised, answered `working` (with how far it got), and
runs once. A repeat may cross the answer on the wire (it is sent while the last slice
runs): for ANSWER_SECONDS after the answer the same id from the same connection gets
that answer again, not a second run.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from ..core.generation import Generation

MAX_GENERATIONS = 8        # in progress at once (each holds a copy of the weights)
SLICE_SECONDS = 0.05       # generating per turn of the loop, over all of them
ANSWER_SECONDS = 10.0      # how long an answer is given again to a repeat
MAX_ANSWERS = 64           # answers kept for repeats (each up to 4,096 tokens)


@dataclass
class _Job:
    envelope: list[bytes]
    request_id: object
    stream: str
    generation: Generation

    @property
    def key(self) -> tuple:
        """Who asked, and under which id: a repeat has the same."""
        return tuple(self.envelope), self.request_id


class Generations:
    def __init__(self, metrics):
        self.metrics = metrics
        self.jobs: deque[_Job] = deque()
        # _Job.key -> (when answered, the answer), oldest first
        self.answered: OrderedDict[tuple, tuple[float, dict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def full(self) -> bool:
        return len(self.jobs) >= MAX_GENERATIONS

    def add(self, envelope: list[bytes], request_id, stream: str,
            generation: Generation) -> None:
        self.jobs.append(_Job(envelope, request_id, stream, generation))

    def working(self, envelope: list[bytes], request_id) -> dict | None:
        """The answer to a request asked again while it runs, or just after, else None."""
        now = time.monotonic()
        while self.answered and next(iter(self.answered.values()))[0] < now - ANSWER_SECONDS:
            self.answered.popitem(last=False)
        if (key := (tuple(envelope), request_id)) in self.answered:
            return self.answered[key][1]
        for job in self.jobs:
            if job.key == key:
                g = job.generation
                return {"type": "working", "id": request_id, "request": "generate",
                        "progress": len(g.tokens) / g.num_tokens}
        return None

    def advance(self) -> list[tuple[list[bytes], dict]]:
        """Generate for up to SLICE_SECONDS, oldest first, each in turn (one that is not
        finished goes to the back); the (envelope, reply) of those finished."""
        deadline = time.perf_counter() + SLICE_SECONDS
        finished = []
        for _ in range(len(self.jobs)):
            job = self.jobs.popleft()
            before = len(job.generation.tokens)
            done = job.generation.advance(pause=lambda: time.perf_counter() >= deadline)
            self.metrics.generated_tokens.inc(len(job.generation.tokens) - before)
            if done:
                reply = {"type": "generated", "stream": job.stream,
                         "tokens": job.generation.tokens}
                if job.request_id is not None:
                    reply["id"] = job.request_id
                    self.answered[job.key] = (time.monotonic(), reply)
                    if len(self.answered) > MAX_ANSWERS:
                        self.answered.popitem(last=False)
                finished.append((job.envelope, reply))
            else:
                self.jobs.append(job)
            if time.perf_counter() >= deadline:
                break
        return finished
