"""What the daemon answers to each request: a reply dict, computed in process, no sockets.

The daemon's loop (daemon.py) decodes a message, calls `Handlers.handle`, and sends the
reply once the log holds what it acknowledges. A `checkpoint` request is answered later,
when the checkpoint is durable (`handle` returns a Deferred for it): the loop never
waits for a write.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import torch

from .. import __version__, wire
from ..config import Config
from ..core.collective import weights_checksum
from ..core.generation import Generation
from ..core.learner import LearnResult, Learner
from .checkpointer import Checkpointer
from .cluster import Cluster
from .generations import Generations
from .journal import FLUSH_RECORD_STREAMS, Journal, LogFull, tokens_record

MAX_PREDICT_BACKLOG = 16384  # predict/generate run the model over a stream's backlog
RECENT_SECONDS = 60.0
MAX_RETRY_MS = 5000


@dataclass(frozen=True)
class Generating:
    """No reply yet: the loop advances this generation a slice per turn (generations.py)
    and answers once it is done."""
    generation: Generation


@dataclass(frozen=True)
class Deferred:
    """No reply yet: the checkpoint with this ticket answers it (Checkpointer.results)."""
    ticket: int


class Activity:
    """When each stream last sent tokens, oldest first: for idle flushes (train.
    flush_after_seconds) and for forgetting silent streams (train.forget_after_seconds)."""

    def __init__(self):
        self.unflushed: OrderedDict[str, float] = OrderedDict()  # streams with fresh input
        self.live: OrderedDict[str, float] = OrderedDict()       # streams not ended

    def input(self, stream: str, now: float) -> None:
        for table in (self.unflushed, self.live):
            table[stream] = now
            table.move_to_end(stream)

    def flush_soon(self, stream: str) -> None:
        """First in line for the next flush (as if idle since forever)."""
        self.unflushed[stream] = -math.inf
        self.unflushed.move_to_end(stream, last=False)

    def idle(self, table: OrderedDict[str, float], now: float, seconds: float) -> list[str]:
        """The streams of `table` quiet for `seconds`, taken out of it, oldest first."""
        out = []
        while table and now - next(iter(table.values())) >= seconds:
            out.append(table.popitem(last=False)[0])
        return out


class Rate:
    """Targets trained recently, over the seconds spent training them: an idle daemon
    does not look slow (that would make its busy hints too long)."""

    def __init__(self):
        self.recent: deque[tuple[float, int, float, float]] = deque()  # (when, targets,
        #   bits, seconds training)
        # the sums over `recent`, kept as it changes: every tokens message reads them
        # (walking 3,000 turns each time took 0.35 ms a message). The float sums drift
        # by rounding only, and start again from the one entry left after a pause.
        self.targets, self.bits, self.seconds = 0, 0.0, 0.0

    def add(self, now: float, result: LearnResult, seconds: float) -> None:
        self.recent.append((now, result.targets, result.bits, seconds))
        self._count(result.targets, result.bits, seconds, +1)
        while self.recent and self.recent[0][0] < now - RECENT_SECONDS:
            _, targets, bits, old_seconds = self.recent.popleft()
            self._count(targets, bits, old_seconds, -1)
        if len(self.recent) == 1:  # the sums of one entry are that entry: no drift kept
            _, self.targets, self.bits, self.seconds = self.recent[0]

    def _count(self, targets: int, bits: float, seconds: float, sign: int) -> None:
        self.targets += sign * targets
        self.bits += sign * bits
        self.seconds += sign * seconds

    def totals(self, since: float = -math.inf) -> tuple[int, float, float]:
        """(targets, bits, seconds training) over the last RECENT_SECONDS of training
        (the updates of the last RECENT_SECONDS before the latest one), or only those
        after `since` (a walk: for status, not per message)."""
        if since == -math.inf:
            return self.targets, self.bits, self.seconds
        recent = [r for r in self.recent if r[0] >= since]
        return (sum(r[1] for r in recent), sum(r[2] for r in recent),
                sum(r[3] for r in recent))

    def tokens_per_second(self) -> float | None:
        """Targets per second spent training, or None before anything trained."""
        targets, _, seconds = self.totals()
        return targets / seconds if targets and seconds > 0 else None


class Handlers:
    def __init__(self, config: Config, learner: Learner, journal: Journal,
                 checkpointer: Checkpointer, metrics, clock: Callable[[], float],
                 cluster: Cluster, generations: Generations):
        self.config, self.learner, self.journal = config, learner, journal
        self.checkpointer = checkpointer
        self.metrics, self.clock, self.cluster = metrics, clock, cluster
        self.generations = generations
        self.started = clock()
        self.activity = Activity()
        self.rate = Rate()
        self.checksum: tuple[int, int] | None = None  # (update count, weights checksum)
        # streams whose last answer was busy, at which offset: the messages a producer
        # had sent after that one are answered busy too, not as gaps (they are no
        # fault); at most ingest.max_streams, the oldest forgotten first
        self.busy_at: OrderedDict[str, int] = OrderedDict()

    def handle(self, request: wire.Request) -> dict | Deferred | Generating:
        if request.stream is not None and self.cluster.owner(request.stream) != \
                self.cluster.rank:
            reply = self.moved(request.stream)
        else:
            reply = getattr(self, f"_on_{request.type}")(request)
        if isinstance(reply, dict) and request.request_id is not None:
            reply["id"] = request.request_id
        return reply

    # ---- tokens ----------------------------------------------------------------------
    def _on_tokens(self, r: wire.Request) -> dict:
        streams = self.learner.streams
        expected = streams.next_offset(r.stream)
        if r.offset > expected:
            if self.busy_at.get(r.stream) == expected:  # on its way after a busy one
                return self.busy(r.stream, self.retry_after_ms(len(r.tokens)))
            return nack("gap", f"offset {r.offset} is past the stream's end: the next "
                        f"expected offset is {expected}", stream=r.stream,
                        next_offset=expected)
        new = r.tokens[expected - r.offset:]
        if len(new) and r.stream in streams.ended:
            return nack("ended", f"stream {r.stream!r} has ended (an end request); its id "
                        "is free again once its last tokens are trained and it is "
                        "forgotten: then position reports 0", stream=r.stream)
        if len(new):
            if r.stream not in streams.row_of and \
                    len(streams.ids) >= self.config.ingest.max_streams:
                return nack("too_many_streams", f"{len(streams.ids)} streams already "
                            "(ingest.max_streams)", stream=r.stream)
            if self.learner.num_untrained + len(new) > self.queue_limit():
                return self.busy(r.stream, self.retry_after_ms(len(new)), at=expected)
            try:
                self.journal.do(self.learner, tokens_record(r.stream, new))
            except LogFull:
                return self.busy(r.stream, 1000, at=expected)
            self.busy_at.pop(r.stream, None)
            self.activity.input(r.stream, self.clock())
        self.metrics.tokens_received.inc(len(new))
        self.metrics.tokens_duplicate.inc(len(r.tokens) - len(new))
        return {"type": "ack", "stream": r.stream, "next_offset": expected + len(new),
                "accepted": len(new), "duplicates": len(r.tokens) - len(new)}

    def moved(self, stream: str) -> dict:
        """Another rank owns the stream: never an ack, so nothing lands on two ranks."""
        owner = self.cluster.owner(stream)
        endpoint = self.cluster.endpoints[owner] if self.cluster.endpoints else None
        return nack("moved", f"stream {stream!r} belongs to rank {owner} ({endpoint}); ask "
                    "topology for the map", stream=stream, rank=owner, endpoint=endpoint,
                    generation=self.cluster.generation)

    def _on_topology(self, r: wire.Request) -> dict:
        return self.cluster.topology()

    def busy(self, stream: str, retry_after_ms: int, at: int | None = None) -> dict:
        """`at`: the offset of the tokens refused (the producer resends from it)."""
        self.metrics.busy.inc()
        if at is not None:
            self.busy_at[stream] = at
            self.busy_at.move_to_end(stream)
            if len(self.busy_at) > self.config.ingest.max_streams:
                self.busy_at.popitem(last=False)
        return {"type": "busy", "stream": stream, "retry_after_ms": retry_after_ms}

    def queue_limit(self) -> int:
        """The most tokens the queue takes now: ingest.max_queued_tokens, and, once a
        training rate is known, no more than ingest.max_queued_seconds of training at
        that rate, but always one full message (ingest.max_tokens_per_message). Also
        the gauge streamrnn_ingest_queue_limit_tokens."""
        ingest = self.config.ingest
        limit = ingest.max_queued_tokens
        rate = self.rate.tokens_per_second()
        if ingest.max_queued_seconds and rate is not None:
            by_time = max(ingest.max_tokens_per_message, int(ingest.max_queued_seconds * rate))
            limit = min(limit, by_time)
        self.metrics.queue_limit.set(limit)
        return limit

    def retry_after_ms(self, incoming: int = 0) -> int:
        """How long until the queue is down to 3/4 of its limit, and has room for the
        `incoming` tokens refused, at the training rate (targets per second spent
        training); at least ingest.busy_retry_ms, at most 5 s; 1 s when nothing trained
        recently. Producers that wait that long find room, instead of resending into a
        full queue."""
        limit, queued = self.queue_limit(), self.learner.num_untrained
        excess = max(queued - 0.75 * limit, queued + incoming - limit)
        targets, _, seconds = self.rate.totals()
        wait_ms = 1000 * excess * seconds / targets if targets else 1000
        return int(min(MAX_RETRY_MS, max(self.config.ingest.busy_retry_ms, wait_ms)))

    def _on_position(self, r: wire.Request) -> dict:
        return {"type": "position", "stream": r.stream,
                "next_offset": self.learner.streams.next_offset(r.stream)}

    # ---- the model -------------------------------------------------------------------
    def _backlogged(self, r: wire.Request) -> dict | None:
        backlog = self.learner.streams.untrained(r.stream)
        if backlog <= MAX_PREDICT_BACKLOG:
            return None
        return nack("backlogged", f"stream has {backlog:,} tokens not trained yet; "
                    f"{r.type} answers once fewer than {MAX_PREDICT_BACKLOG:,} are "
                    "(it runs the model over them)", stream=r.stream)

    def _on_predict(self, r: wire.Request) -> dict:
        if refusal := self._backlogged(r):
            return refusal
        probs = self.learner.predict(r.stream).exp()
        # most likely first, ties by token: a stable sort keeps equal ones in token order
        values, tokens = torch.sort(probs, descending=True, stable=True)
        values, tokens = values[:r.top_k], tokens[:r.top_k]
        return {"type": "prediction", "stream": r.stream,
                "next_offset": self.learner.streams.next_offset(r.stream),
                "top": [[int(t), float(v)] for t, v in zip(tokens, values)]}

    def _on_generate(self, r: wire.Request) -> dict | Generating:
        if refusal := self._backlogged(r):
            return refusal
        if self.generations.full:  # each holds a copy of the weights
            return self.busy(r.stream, 1000)
        return Generating(self.learner.generation(r.stream, r.num_tokens, r.temperature,
                                                  r.seed))

    # ---- streams ---------------------------------------------------------------------
    def _on_flush(self, r: wire.Request) -> dict:
        # logged here, trained by the next updates: never all at once, in this request
        streams = self.learner.streams
        candidates = streams.ids if r.stream is None else [r.stream]
        scheduled = [sid for sid in candidates if streams.untrained(sid) > 0]
        if not self.flush(scheduled):
            return self.busy(r.stream, 1000)
        return {"type": "flush", "stream": r.stream, "scheduled": len(scheduled)}

    def flush(self, stream_ids: list[str]) -> bool:
        """Their last r < k1 targets train in the next updates (logged first, in records
        of at most FLUSH_RECORD_STREAMS; False if the log cannot take them)."""
        streams = self.learner.streams
        wanted = [sid for sid in stream_ids if streams.untrained(sid) > 0 and
                  not streams.flushing[streams.row_of[sid]]]
        try:
            for first in range(0, len(wanted), FLUSH_RECORD_STREAMS):
                self.journal.do(self.learner, {"t": "flush", "s": wanted[
                    first:first + FLUSH_RECORD_STREAMS]})
        except LogFull:
            return False
        return True

    def _on_end(self, r: wire.Request) -> dict:
        streams = self.learner.streams
        known, next_offset = r.stream in streams.row_of, streams.next_offset(r.stream)
        if known and not self.end(r.stream):
            return self.busy(r.stream, 1000)
        return {"type": "ended", "stream": r.stream, "known": known,
                "next_offset": next_offset}

    def end(self, stream: str) -> bool:
        """End a known stream (logged first; False if the log cannot take it): its last
        targets train in the next updates, then it is forgotten."""
        if stream not in self.learner.streams.ended:
            try:
                self.journal.do(self.learner, {"t": "end", "s": stream})
            except LogFull:
                return False
        self.activity.live.pop(stream, None)
        self.activity.unflushed.pop(stream, None)
        return True

    # ---- the daemon ------------------------------------------------------------------
    def _on_checkpoint(self, r: wire.Request) -> Deferred:
        # the ranks decide at the next tick: a new one, or the last if nothing changed
        return Deferred(self.checkpointer.request())

    def _on_status(self, r: wire.Request) -> dict:
        # equal on every rank of a cluster (one model). Note: a device sync, and a copy
        # of the weights as int64: once per update count (only an update changes them
        # once requests are answered), for however many status requests come
        updates = self.learner.updates
        if self.checksum is None or self.checksum[0] != updates:
            self.checksum = (updates, weights_checksum(list(self.learner.model.parameters())))
        return {"type": "status", **self.status(), "weights_checksum": self.checksum[1]}

    def status(self) -> dict:
        learner, c = self.learner, self.config
        now = self.clock()
        uptime = now - self.started
        targets, bits, _ = self.rate.totals(since=now - RECENT_SECONDS)
        training_rate = self.rate.tokens_per_second()
        return {
            "version": __version__, "uptime_seconds": float(uptime),
            "device": str(learner.device),
            "model": f"{c.model.kind} {c.model.num_layers}x{c.model.hidden_size}",
            "vocab_size": c.model.vocab_size,
            "tbptt": [c.train.k1, c.train.k2],
            "updates": learner.updates, "tokens_trained": learner.tokens_trained,
            "bits": float(learner.bits), "tokens_received": learner.streams.num_received,
            "streams": len(learner.streams.ids), "queued_tokens": learner.num_untrained,
            "queue_limit_tokens": self.queue_limit(),
            "recent_bits_per_token": float(bits / targets) if targets else None,
            "recent_tokens_per_second": float(targets / max(1e-9, min(RECENT_SECONDS,
                                                                     uptime))),
            "training_tokens_per_second": (float(training_rate) if training_rate is not None
                                           else None),
            "last_checkpoint": saved_fields(self.checkpointer.last),
            "rank": self.cluster.rank, "world_size": self.cluster.world_size,
            "generation": self.cluster.generation,
            "score_endpoints": list(self.cluster.score_endpoints),
        }


def checkpoint_reply(saved) -> dict:
    if saved is None:
        return {"type": "checkpoint", "ok": False,
                "error": "the write failed; see the daemon's log"}
    return {"type": "checkpoint", "ok": True, **saved_fields(saved)}


def saved_fields(saved) -> dict | None:
    if saved is None:
        return None
    try:
        created = saved.path.stat().st_mtime
    except OSError:  # removed meanwhile (keep), or unreadable
        created = None
    return {"path": str(saved.path.absolute()), "number": saved.number,
            "wal_seq": saved.wal_seq, "seconds": round(saved.seconds, 3),
            "created": created}


def nack(reason: str, message: str, **extra) -> dict:
    return {"type": "nack", "reason": reason, "message": message, **extra}
