"""`streamrnn serve`: the long-running daemon.

    start:  learner, metrics endpoint, bind the ROUTER
    loop:   poll -> handle requests (bounded) -> train (bounded) -> housekeeping
    stop:   SIGTERM/SIGINT only set a flag; the loop ends its turn, then an ordered
            shutdown closes the socket and the metrics endpoint

One thread does everything that touches the model, so no locks: a predict request is
answered between two training turns, while learning goes on.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from collections import OrderedDict, deque

import prometheus_client
import torch
import zmq

from .. import wire
from . import auth, faults, logs
from ..config import Config, StartupError
from ..core.learner import LearnResult, Learner
from .durability import FLUSH_RECORD_STREAMS, Durability, IncompatibleState, LogFull
from .wal import WalSyncFailed
from .metrics import Metrics
from .source import Incoming, Source
from .systemd import Notifier

HOUSEKEEPING_SECONDS = 0.5
INTAKE_SECONDS = 0.25  # handling requests at most this long before training resumes
MAX_PREDICT_BACKLOG = 16384  # predict/generate run the model over a stream's backlog
RECENT_SECONDS = 60.0
STATUS_SECONDS = 5.0


class Daemon:
    def __init__(self, config: Config, fresh: bool = False):
        self.config = config
        self.fresh = fresh
        self.outbox: list[tuple[list[bytes], dict]] = []  # replies waiting for the fsync
        self.log = logs.get("streamrnn.daemon")
        self.stop_requested = False
        self.notifier = Notifier()
        self.limits = wire.Limits(config.model.vocab_size, config.ingest.max_message_bytes,
                                  config.ingest.max_tokens_per_message,
                                  config.ingest.max_stream_id_bytes)
        self.started = time.monotonic()
        self.inbox: deque[Incoming] = deque()  # received, not handled yet
        self.last_seen: OrderedDict[str, float] = OrderedDict()  # streams with fresh input
        self.last_input: OrderedDict[str, float] = OrderedDict()  # every live stream's
        #   latest tokens, oldest first (train.forget_after_seconds)
        self.recent: deque[tuple[float, int, float]] = deque()  # (time, targets, bits)
        self.refused = logs.Bursts(self.log, "refused input")
        self.training_pending = False
        self.next_housekeeping = self.next_status = 0.0
        self.next_key_reload = 0.0
        self.next_summary = time.monotonic() + config.log.summary_seconds

    # ---- lifecycle ---------------------------------------------------------------------
    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        try:
            self.start()
        except BaseException:
            self.shutdown(started=False)  # the caller says why; no "stopped" totals
            raise
        try:
            while not self.stop_requested:
                self.turn()
            self.notifier.stopping()
            self.source.close()  # no more input: everything acked is in the log
            saved = self.durability.checkpoint(wait=True)  # the next start replays nothing
            if saved is None:
                self.log.error("final checkpoint failed; the next start replays the log")
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True  # the loop notices within one turn

    def start(self) -> None:
        c = self.config
        self.log.info("starting", model=f"{c.model.kind} {c.model.num_layers}x"
                      f"{c.model.hidden_size} vocab {c.model.vocab_size}",
                      tbptt=f"({c.train.k1}, {c.train.k2})", optimizer=c.train.optimizer,
                      lr=c.train.lr, device=c.train.device, precision=c.train.precision)
        self.learner = Learner(c)
        self.metrics = Metrics()
        self.metrics.watch_device(self._device_memory)
        self.metrics.build.info({"version": _version(), "torch": torch.__version__,
                                 "device": str(self.learner.device)})
        self.metrics.queue_limit.set(c.ingest.max_queued_tokens)
        # read at scrape time (the HTTP thread reads plain ints: no lock needed)
        self.metrics.active_streams.set_function(lambda: len(self.learner.streams.ids))
        self.metrics.queue_tokens.set_function(lambda: self.learner.untrained_tokens)
        self.metrics.resident_streams.set_function(
            lambda: self.learner.streams.states.num_resident)
        self.metrics.spilled_streams.set_function(
            lambda: self.learner.streams.states.num_spilled)
        self.durability = Durability(c, self.learner, self.metrics, self.log)
        # before anyone can send: state first (systemd hears that a long replay goes on)
        self.durability.recover(self.fresh, should_stop=lambda: self.stop_requested,
                                progress=lambda line: self.notifier.extend_start(60, line))
        now = time.monotonic()
        for stream in self.learner.streams.ids:  # recovered streams still owe a flush
            if self.learner.streams.untrained(stream) > 0:
                self.last_seen[stream] = now
            if stream not in self.learner.streams.ended:
                self.last_input[stream] = now
        self.metrics.wal_bytes.set_function(lambda: self.durability.wal_bytes)
        self.metrics_server = None
        if c.metrics.port:
            self.metrics_server = self.metrics.serve(c.metrics.address, c.metrics.port)
        self.context = zmq.Context()
        self.source = Source(c.ingest, self.context)
        self.notifier.ready(f"listening on {self.source.endpoint}")
        self.log.info("listening", endpoint=self.source.endpoint,
                      curve="on" if self.source.curve else "off",
                      metrics=(f"http://{c.metrics.address}:{c.metrics.port}/metrics"
                               if c.metrics.port else "off"), device=str(self.learner.device))

    def shutdown(self, started: bool = True) -> None:
        if started:
            self.log.info("stopping")
        if hasattr(self, "source"):
            self.source.close()
            self.context.term()
        if hasattr(self, "durability"):
            self.durability.close()
        if getattr(self, "metrics_server", None):
            server, thread = self.metrics_server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self.refused.emit(force=True)
        if started:
            self.log.info("stopped", updates=self.learner.updates,
                          tokens_trained=self.learner.tokens_trained)

    # ---- the loop ------------------------------------------------------------------------
    def turn(self) -> None:
        """One turn: take what the network has, train a bounded amount, look after things."""
        faults.maybe_hang("turn")
        self.notifier.ping()  # from this loop only: if it hangs, systemd restarts us
        timeout_ms = 0 if self.training_pending or self.inbox else 50
        if self.inbox or self.source.socket.poll(timeout_ms, zmq.POLLIN):
            self.intake()
        max_updates = self.config.train.updates_per_turn
        started = time.perf_counter()
        result = LearnResult()
        if self.durability.healthy:  # no training that the log cannot record
            # between updates the socket is read again: acks wait one update at most
            result = self.learner.train(max_updates, between=self._after_update)
        self.account(result, time.perf_counter() - started)
        self.durability.sync_if_due()
        self.training_pending = result.updates == max_updates
        now = time.monotonic()
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_SECONDS
            self.housekeeping(now)

    def intake(self) -> None:
        """Handle what the network has, without waiting, for at most INTAKE_SECONDS (slow
        requests such as generate must not starve training or the watchdog; the rest
        waits in the inbox); the replies go out once the log holds what they acknowledge."""
        room = self.config.ingest.max_messages_per_turn - len(self.inbox)
        if room > 0:
            self.inbox.extend(self.source.receive(room))
        deadline = time.monotonic() + INTAKE_SECONDS
        while self.inbox and time.monotonic() < deadline:
            self.handle(self.inbox.popleft())
        if self.outbox:
            self.durability.commit()
            for envelope, reply in self.outbox:
                self.source.reply(envelope, reply)
            self.outbox.clear()

    def _after_update(self) -> bool:
        try:
            self.durability.log_train()  # in log order: after the tokens it saw
        except LogFull:
            return False  # the update ran, its record did not: no more until there's room
        self.notifier.ping()
        self.intake()
        return True

    def handle(self, incoming: Incoming) -> None:
        if incoming.payload is None:
            request = wire.Refusal("malformed", "expected one frame from a DEALER socket, or "
                                   "an empty frame and one frame from a REQ socket")
        else:
            request = wire.decode(incoming.payload, self.limits)
        if isinstance(request, wire.Refusal):
            return self.refuse(incoming.envelope, request)
        self.metrics.messages.labels(request.type).inc()
        try:
            faults.maybe_fail(f"request_{request.type}")
            reply = getattr(self, f"_on_{request.type}")(request)
        except WalSyncFailed:
            raise  # nothing more may be acknowledged: end (the next start replays the log)
        except Exception as e:  # a bug or a sick model (NaN weights) must not end the daemon
            self.log.exception("request failed", type=request.type)
            reply = _nack("internal", f"{request.type} failed in the daemon: "
                          f"{type(e).__name__}: {e}"[:300])
        if reply.get("type") == "nack":
            self._count_refusal(reply["reason"], reply["message"])
        if request.request_id is not None:
            reply["id"] = request.request_id
        self.outbox.append((incoming.envelope, reply))

    def refuse(self, envelope: list[bytes], refusal: wire.Refusal) -> None:
        self._count_refusal(refusal.reason, refusal.message)
        self.outbox.append((envelope, wire.refusal_reply(refusal)))

    # ---- requests ------------------------------------------------------------------------
    def _on_tokens(self, r: wire.Request) -> dict:
        streams = self.learner.streams
        expected = streams.next_offset(r.stream)
        if r.offset > expected:
            return _nack("gap", f"offset {r.offset} is past the stream's end: the next "
                         f"expected offset is {expected}", stream=r.stream,
                         next_offset=expected)
        new = r.tokens[expected - r.offset:]
        if len(new) and r.stream in streams.ended:
            return _nack("ended", f"stream {r.stream!r} has ended (an end request); its id "
                         "is free again once its last tokens are trained and it is "
                         "forgotten: then position reports 0", stream=r.stream)
        if len(new):
            if r.stream not in streams.row_of and \
                    len(streams.ids) >= self.config.ingest.max_streams:
                return _nack("too_many_streams", f"{len(streams.ids)} streams already "
                             "(ingest.max_streams)", stream=r.stream)
            if self.learner.untrained_tokens + len(new) > self.config.ingest.max_queued_tokens:
                self.metrics.busy.inc()
                return {"type": "busy", "stream": r.stream,
                        "retry_after_ms": self._retry_after_ms()}
            if not self.durability.log_tokens(r.stream, new):
                self.metrics.busy.inc()
                return {"type": "busy", "stream": r.stream, "retry_after_ms": 1000}
            self.learner.add(r.stream, new)
            self.last_seen[r.stream] = self.last_input[r.stream] = time.monotonic()
            self.last_seen.move_to_end(r.stream)
            self.last_input.move_to_end(r.stream)
        self.metrics.tokens_received.inc(len(new))
        self.metrics.tokens_duplicate.inc(len(r.tokens) - len(new))
        return {"type": "ack", "stream": r.stream, "next_offset": expected + len(new),
                "accepted": len(new), "duplicates": len(r.tokens) - len(new)}

    def _retry_after_ms(self) -> int:
        """How long until the queue is down to 3/4 of its limit at the recent training
        rate (at least ingest.busy_retry_ms, at most 5 s): producers that wait that long
        find room, instead of resending into a full queue."""
        limit = self.config.ingest.max_queued_tokens
        excess = self.learner.untrained_tokens - 0.75 * limit
        recent = sum(t for _, t, _ in self.recent)
        window = min(RECENT_SECONDS, max(1.0, time.monotonic() - self.started))
        rate = recent / window
        wait_ms = 1000 * excess / rate if rate > 0 else 1000
        return int(min(5000, max(self.config.ingest.busy_retry_ms, wait_ms)))

    def _on_position(self, r: wire.Request) -> dict:
        return {"type": "position", "stream": r.stream,
                "next_offset": self.learner.streams.next_offset(r.stream)}

    def _backlogged(self, r: wire.Request) -> dict | None:
        backlog = self.learner.streams.untrained(r.stream)
        if backlog <= MAX_PREDICT_BACKLOG:
            return None
        return _nack("backlogged", f"stream has {backlog:,} tokens not trained yet; "
                     f"{r.type} answers once fewer than {MAX_PREDICT_BACKLOG:,} are "
                     "(it runs the model over them)", stream=r.stream)

    def _on_predict(self, r: wire.Request) -> dict:
        if refusal := self._backlogged(r):
            return refusal
        probs = self.learner.predict(r.stream).exp()
        values, tokens = torch.topk(probs, r.top_k)
        return {"type": "prediction", "stream": r.stream,
                "next_offset": self.learner.streams.next_offset(r.stream),
                "top": [[int(t), float(v)] for t, v in zip(tokens, values)]}

    def _on_generate(self, r: wire.Request) -> dict:
        if refusal := self._backlogged(r):
            return refusal
        tokens = self.learner.generate(r.stream, r.num_tokens, r.temperature, r.seed)
        return {"type": "generated", "stream": r.stream, "tokens": tokens}

    def _on_flush(self, r: wire.Request) -> dict:
        # scheduled, not done here: training the queue first could hold intake for long
        streams = self.learner.streams
        candidates = streams.ids if r.stream is None else [r.stream]
        scheduled = [sid for sid in candidates if streams.untrained(sid) > 0]
        for stream in scheduled:
            self._flush_soon(stream)
        return {"type": "flush", "stream": r.stream, "scheduled": len(scheduled)}

    def _on_end(self, r: wire.Request) -> dict:
        streams = self.learner.streams
        known = r.stream in streams.row_of
        if known and not self._end(r.stream):
            self.metrics.busy.inc()
            return {"type": "busy", "stream": r.stream, "retry_after_ms": 1000}
        return {"type": "ended", "stream": r.stream, "known": known,
                "next_offset": streams.next_offset(r.stream)}

    def _end(self, stream: str) -> bool:
        """End a known stream (logged first; False if the log cannot take it). It is
        flushed, and so forgotten, at the next housekeeping with no backlog."""
        if stream not in self.learner.streams.ended:
            if not self.durability.log_end(stream):
                return False
            self.learner.end(stream)
        self.last_input.pop(stream, None)
        self._flush_soon(stream)
        return True

    def _flush_soon(self, stream: str) -> None:
        """First in line for the next housekeeping flush (as if idle since forever)."""
        self.last_seen[stream] = -math.inf
        self.last_seen.move_to_end(stream, last=False)

    def _on_checkpoint(self, r: wire.Request) -> dict:
        last, durability = self.durability.last_checkpoint, self.durability
        if last is not None and durability.wal is not None and \
                last.wal_seq == durability.wal_seq and \
                self.learner.updates == durability.updates_at_checkpoint:
            return {"type": "checkpoint", "ok": True, **_saved(last)}  # nothing new since
        saved = self.durability.checkpoint(wait=True)
        if saved is None:
            return {"type": "checkpoint", "ok": False,
                    "error": "the write failed; see the daemon's log"}
        return {"type": "checkpoint", "ok": True, **_saved(saved)}

    def _on_status(self, r: wire.Request) -> dict:
        return {"type": "status", **self.status()}

    def status(self) -> dict:
        learner = self.learner
        recent_targets = sum(t for _, t, _ in self.recent)
        recent_bits = sum(b for _, _, b in self.recent)
        window = max(1e-9, min(RECENT_SECONDS, time.monotonic() - self.started))
        c = self.config
        return {
            "version": _version(), "uptime_seconds": time.monotonic() - self.started,
            "device": str(learner.device),
            "model": f"{c.model.kind} {c.model.num_layers}x{c.model.hidden_size}",
            "tbptt": [c.train.k1, c.train.k2],
            "updates": learner.updates, "tokens_trained": learner.tokens_trained,
            "bits": learner.bits, "tokens_received": learner.streams.total_tokens,
            "streams": len(learner.streams.ids), "queued_tokens": learner.untrained_tokens,
            "recent_bits_per_token": (recent_bits / recent_targets if recent_targets
                                      else None),
            "recent_tokens_per_second": recent_targets / window,
            "last_checkpoint": _saved(self.durability.last_checkpoint),
        }

    # ---- bookkeeping ---------------------------------------------------------------------
    def account(self, result: LearnResult, seconds: float) -> None:
        m = self.metrics
        m.updates_per_turn.observe(result.updates)
        if not result.updates:
            return
        m.updates.inc(result.updates)
        for width in result.batch_streams:
            m.batch_streams.observe(width)
            m.update_seconds.observe(seconds / result.updates)
        if math.isfinite(result.bits):  # bits and targets together: their ratio stays true
            m.tokens_trained.inc(result.targets)
            m.bits.inc(result.bits)
            now = time.monotonic()
            self.recent.append((now, result.targets, result.bits))
            while self.recent and self.recent[0][0] < now - RECENT_SECONDS:
                self.recent.popleft()
        else:
            m.nonfinite_updates.inc()
            self.log.error("loss is not finite", updates=result.updates, bits=result.bits)

    def housekeeping(self, now: float) -> None:
        flush_after = self.config.train.flush_after_seconds or math.inf
        if not self.training_pending and self.durability.healthy:
            idle = []  # streams idle long enough, or asked to flush (-inf)
            while self.last_seen and now - next(iter(self.last_seen.values())) >= flush_after:
                idle.append(self.last_seen.popitem(last=False)[0])
            if idle:
                self._flush(idle)
        forget_after = self.config.train.forget_after_seconds or math.inf
        while self.last_input and now - next(iter(self.last_input.values())) >= forget_after:
            if not self._end(next(iter(self.last_input))):
                break  # the log is full: again once it has room
        self.durability.maybe_checkpoint(now)
        m, learner = self.metrics, self.learner
        m.learning_rate.set(learner.optimizer.param_groups[0]["lr"])
        if learner.engine.last_grad_norm is not None:
            m.grad_norm.set(float(learner.engine.last_grad_norm))  # a device sync, 2/s
        self.refused.emit()
        for kind, count in self.source.failed_handshakes().items():
            self.metrics.handshake_failures.labels(kind).inc(count)
            self.refused.add(f"handshake_{kind}", "a connection failed its handshake (a "
                             "key not allowed, or a client without CURVE)", count)
        if self.source.authenticator is not None and now >= self.next_key_reload:
            self.next_key_reload = now + 30.0  # new producer keys need no restart
            auth.reload(self.source.authenticator, self.config.ingest.curve_allowed_keys)
        if now >= self.next_status:
            self.next_status = now + STATUS_SECONDS
            s = self.status()
            bits = s["recent_bits_per_token"]
            self.notifier.status(
                f"{s['recent_tokens_per_second']:,.0f} tokens/s, "
                + (f"{bits:.3f} bits/token, " if bits is not None else "")
                + f"{s['streams']:,} streams, {s['queued_tokens']:,} queued")
        summary = self.config.log.summary_seconds
        if summary and now >= self.next_summary:
            self.next_summary = now + summary
            s = self.status()
            self.log.info("progress", updates=s["updates"], tokens_trained=s["tokens_trained"],
                          tokens_per_second=round(s["recent_tokens_per_second"]),
                          bits_per_token=s["recent_bits_per_token"], streams=s["streams"],
                          queued_tokens=s["queued_tokens"])

    def _flush(self, streams: list[str]) -> None:
        for first in range(0, len(streams), FLUSH_RECORD_STREAMS):  # bounded log records
            group = streams[first:first + FLUSH_RECORD_STREAMS]
            started = time.perf_counter()
            try:
                self.durability.log_flush(group)
            except LogFull:
                for stream in streams[first:]:  # again once the log has room
                    self._flush_soon(stream)
                return
            before = len(self.learner.streams.ids)
            result = self.learner.flush(group)  # also forgets ended streams it emptied
            self.account(result, time.perf_counter() - started)
            self.metrics.flushes.inc(result.streams)
            self.metrics.streams_ended.inc(before - len(self.learner.streams.ids))

    def _count_refusal(self, reason: str, message: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.refused.add(reason, message)

    def _device_memory(self) -> tuple[float, float]:
        device = self.learner.device
        if device.type != "cuda":
            return 0.0, 0.0
        return (float(torch.cuda.memory_allocated(device)),
                float(torch.cuda.memory_reserved(device)))


def _saved(saved) -> dict | None:
    if saved is None:
        return None
    try:
        created = saved.path.stat().st_mtime
    except OSError:  # removed meanwhile (keep), or unreadable
        created = None
    return {"path": str(saved.path.absolute()), "wal_seq": saved.wal_seq,
            "seconds": round(saved.seconds, 3), "created": created}


def _nack(reason: str, message: str, **extra) -> dict:
    return {"type": "nack", "reason": reason, "message": message, **extra}


def _version() -> str:
    from .. import __version__
    return __version__


def serve(config: Config, fresh: bool = False) -> int:
    logs.configure(config.log.format, config.log.level)
    prometheus_client.disable_created_metrics()  # no *_created series: noise for dashboards
    try:
        return Daemon(config, fresh).run()
    except (IncompatibleState, StartupError, auth.KeyError_) as e:
        logs.get().error("refusing to start", reason=str(e))
        return 2
