"""`streamrnn serve`: the long-running daemon.

    start:  learner, metrics, recovery, bind the ROUTER   (all built in __init__/start)
    loop:   read the socket -> train: (log, step, read the socket) x updates_per_turn
            -> answer finished checkpoints -> housekeeping
    stop:   SIGTERM/SIGINT only set a flag (a second one exits at once); the loop ends
            its turn, then a final checkpoint and an ordered shutdown

One thread does everything that touches the model, so no locks: a predict request is
answered between two updates, while learning goes on. What each request gets is
handlers.py's; this file is lifecycle and the loop.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import deque
from typing import Callable

import prometheus_client
import torch
import zmq

from .. import __version__, wire
from ..config import Config, StartupError
from ..core.learner import LearnResult, Learner
from ..keys import KeyError_
from . import auth, faults, logs
from .durability import FLUSH_RECORD_STREAMS, Durability, LogFull
from .handlers import Deferred, Handlers, checkpoint_reply, nack
from .metrics import Metrics
from .recovery import IncompatibleState
from .source import Incoming, Source
from .systemd import Notifier
from .wal import WalSyncFailed

HOUSEKEEPING_SECONDS = 0.5
INTAKE_SECONDS = 0.25  # handling requests at most this long before training resumes
STATUS_SECONDS = 5.0
KEY_RELOAD_SECONDS = 30.0


class Daemon:
    def __init__(self, config: Config, fresh: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        """`clock` (monotonic seconds) paces flushes, forgetting, checkpoints and rates:
        tests pass their own."""
        self.config, self.fresh, self.clock = config, fresh, clock
        self.log = logs.get("streamrnn.daemon")
        self.stop_requested = False
        self.notifier = Notifier()
        self.limits = wire.Limits(config.model.vocab_size, config.ingest.max_message_bytes,
                                  config.ingest.max_tokens_per_message,
                                  config.ingest.max_stream_id_bytes)
        self.inbox: deque[Incoming] = deque()  # received, not handled yet
        self.outbox: list[tuple[list[bytes], dict]] = []  # replies waiting for the fsync
        self.awaiting: list[tuple[list[bytes], object, int]] = []  # (envelope, id, ticket)
        self.refused = logs.Bursts(self.log, "refused input")
        self.skipped = logs.Bursts(self.log, "updates skipped: the loss or the gradient "
                                   "was not finite (weights and optimizer unchanged)")
        self.training_pending = False
        self.next_housekeeping = self.next_status = self.next_key_reload = 0.0
        self.next_summary = clock() + config.log.summary_seconds
        self.learner = Learner(config)
        self.metrics = Metrics()
        self.durability = Durability(config, self.learner, self.metrics, self.log, clock)
        self.handlers = Handlers(config, self.learner, self.durability, self.metrics, clock)
        self.source: Source | None = None
        self.context: zmq.Context | None = None
        self.metrics_server = None

    # ---- lifecycle ---------------------------------------------------------------------
    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        try:
            self.start()
            while not self.stop_requested:
                self.turn()
            self.notifier.stopping()
            self.source.close()  # no more input: everything acked is in the log
            # the next start replays nothing
            if self.durability.checkpoint_now(ping=self.notifier.ping) is None:
                self.log.error("final checkpoint failed; the next start replays the log")
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # the second one: the user does not want to wait
            os._exit(128 + signum)  # what was acked is in the log; the next start replays
        self.stop_requested = True  # the loop notices within one turn

    def start(self) -> None:
        c, learner, m = self.config, self.learner, self.metrics
        self.log.info("starting", model=f"{c.model.kind} {c.model.num_layers}x"
                      f"{c.model.hidden_size} vocab {c.model.vocab_size}",
                      tbptt=f"({c.train.k1}, {c.train.k2})", optimizer=c.train.optimizer,
                      lr=c.train.lr, device=c.train.device, precision=c.train.precision)
        m.watch_device(self._device_memory)
        m.build.info({"version": __version__, "torch": torch.__version__,
                      "device": str(learner.device)})
        m.queue_limit.set(c.ingest.max_queued_tokens)
        # before anyone can send: state first (systemd hears that a long replay goes on)
        self.durability.recover(self.fresh, should_stop=lambda: self.stop_requested,
                                progress=lambda line: self.notifier.extend_start(60, line))
        faults.poison(learner)
        now = self.clock()
        for stream in learner.streams.ids:  # recovered streams still owe a flush
            if stream not in learner.streams.ended:
                self.handlers.activity.input(stream, now)
            if learner.streams.untrained(stream) == 0:
                self.handlers.activity.unflushed.pop(stream, None)
        if c.metrics.port:
            self.metrics_server = m.serve(c.metrics.address, c.metrics.port)
        self.context = zmq.Context()
        self.source = Source(c.ingest, self.context)
        self._publish()
        self.notifier.ready(f"listening on {self.source.endpoint}")
        self.log.info("listening", endpoint=self.source.endpoint,
                      curve="on" if self.source.curve else "off",
                      metrics=(f"http://{c.metrics.address}:{c.metrics.port}/metrics"
                               if c.metrics.port else "off"), device=str(learner.device))

    def shutdown(self) -> None:
        started = self.source is not None
        if started:
            self.log.info("stopping")
            self.source.close()
            self.context.term()
        self.durability.close()
        if self.metrics_server:
            server, thread = self.metrics_server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self.refused.emit(force=True)
        self.skipped.emit(force=True)
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
        self.train()
        self.durability.sync_if_due()
        self.durability.poll()  # a finished checkpoint; a due or requested one starts
        self._answer_checkpoints()
        now = self.clock()
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_SECONDS
            self.housekeeping(now)
        self._publish()

    def train(self) -> None:
        """Up to train.updates_per_turn updates. Each is logged before it runs (it is a
        pure function of what the log holds before it, so a replay makes the same one);
        between two the socket is read again, so an ack waits one update at most."""
        max_updates = self.config.train.updates_per_turn
        started, num_updates = time.perf_counter(), 0
        while num_updates < max_updates and (plan := self.learner.next_update()) is not None:
            try:
                self.durability.log_train()
            except LogFull:
                break  # no update the log cannot record: again once it has room
            update_started = time.perf_counter()
            # an exception here ends the daemon: the log says this update ran, and the
            # next start replays it, so the model served always matches the log
            self.learner.step(plan)
            # on a GPU this is host time: the queue of launched work makes it the
            # device's own once the loop runs ahead by a few updates
            self.metrics.update_seconds.observe(time.perf_counter() - update_started)
            num_updates += 1
            self.notifier.ping()
            self.intake()
        self.training_pending = num_updates == max_updates
        self.account(self.learner.settle(), time.perf_counter() - started)

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

    def handle(self, incoming: Incoming) -> None:
        if incoming.payload is None:
            request = wire.Refusal("malformed", "expected one frame from a DEALER socket, or "
                                   "an empty frame and one frame from a REQ socket")
        else:
            request = wire.decode(incoming.payload, self.limits)
        if isinstance(request, wire.Refusal):
            self._count_refusal(request.reason, request.message)
            self.outbox.append((incoming.envelope, wire.refusal_reply(request)))
            return
        self.metrics.messages.labels(request.type).inc()
        try:
            faults.maybe_fail(f"request_{request.type}")
            reply = self.handlers.handle(request)
        except WalSyncFailed:
            raise  # nothing more may be acknowledged: end (the next start replays the log)
        except Exception as e:  # a bug or a sick model must not end the daemon
            self.log.exception("request failed", type=request.type)
            reply = nack("internal", f"{request.type} failed in the daemon: "
                         f"{type(e).__name__}: {e}"[:300])
            if request.request_id is not None:
                reply["id"] = request.request_id
        if isinstance(reply, Deferred):
            self.awaiting.append((incoming.envelope, request.request_id, reply.ticket))
            return
        if reply.get("type") == "nack":
            self._count_refusal(reply["reason"], reply["message"])
        self.outbox.append((incoming.envelope, reply))

    def _answer_checkpoints(self) -> None:
        """Reply to `checkpoint` requests whose write is done (durable, or failed)."""
        done = self.durability.num_finished
        ready = [a for a in self.awaiting if a[2] <= done]
        if not ready:
            return
        self.awaiting = [a for a in self.awaiting if a[2] > done]
        for envelope, request_id, ticket in ready:
            reply = checkpoint_reply(self.durability.results.get(ticket))
            if request_id is not None:
                reply["id"] = request_id
            self.source.reply(envelope, reply)

    # ---- bookkeeping ---------------------------------------------------------------------
    def account(self, result: LearnResult, seconds: float) -> None:
        m = self.metrics
        m.updates_per_turn.observe(result.updates)
        if not result.updates:
            return
        m.updates.inc(result.updates)
        for width in result.batch_streams:
            m.batch_streams.observe(width)
        m.tokens_trained.inc(result.targets)
        m.bits.inc(result.bits)
        self.handlers.rate.add(self.clock(), result, seconds)
        if result.skipped:
            m.nonfinite_updates.inc(result.skipped)
            self.skipped.add("nonfinite", f"{result.skipped_targets} targets not trained",
                             result.skipped)

    def housekeeping(self, now: float) -> None:
        activity, train = self.handlers.activity, self.config.train
        if not self.training_pending and self.durability.has_room():
            idle = activity.idle(activity.unflushed, now, train.flush_after_seconds or math.inf)
            if idle:
                self._flush(idle)
        for stream in activity.idle(activity.live, now, train.forget_after_seconds or math.inf):
            if not self.handlers.end(stream):
                activity.live[stream] = now  # the log is full: again later
                break
        if self.learner.engine.last_grad_norm is not None:
            # note: a device sync, twice a second
            self.metrics.grad_norm.set(float(self.learner.engine.last_grad_norm))
        self.refused.emit()
        self.skipped.emit()
        for kind, count in self.source.failed_handshakes().items():
            self.metrics.handshake_failures.labels(kind).inc(count)
            self.refused.add(f"handshake_{kind}", "a connection failed its handshake (a "
                             "key not allowed, or a client without CURVE)", count)
        if self.source.authenticator is not None and now >= self.next_key_reload:
            self.next_key_reload = now + KEY_RELOAD_SECONDS  # new keys need no restart
            auth.reload(self.source.authenticator, self.config.ingest.curve_allowed_keys)
        self._report(now)

    def _report(self, now: float) -> None:
        """STATUS= for systemd every few seconds; a progress log line now and then."""
        if now >= self.next_status:
            self.next_status = now + STATUS_SECONDS
            s = self.handlers.status()
            bits = s["recent_bits_per_token"]
            self.notifier.status(
                f"{s['recent_tokens_per_second']:,.0f} tokens/s, "
                + (f"{bits:.3f} bits/token, " if bits is not None else "")
                + f"{s['streams']:,} streams, {s['queued_tokens']:,} queued")
        summary = self.config.log.summary_seconds
        if summary and now >= self.next_summary:
            self.next_summary = now + summary
            s = self.handlers.status()
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
                    self.handlers.activity.flush_soon(stream)
                return
            before = len(self.learner.streams.ids)
            result = self.learner.flush_many(group)  # also forgets ended streams it emptied
            self.account(result, time.perf_counter() - started)
            self.metrics.flushes.inc(result.streams)
            self.metrics.streams_ended.inc(before - len(self.learner.streams.ids))

    def _publish(self) -> None:
        """Gauges, set from the loop once per turn: a scrape (on the metrics thread) only
        reads numbers, so nothing it does can fail or race the loop."""
        m, learner = self.metrics, self.learner
        m.active_streams.set(len(learner.streams.ids))
        m.queue_tokens.set(learner.num_untrained)
        m.resident_streams.set(learner.streams.states.num_resident)
        m.spilled_streams.set(learner.streams.states.num_spilled)
        m.wal_bytes.set(self.durability.wal_bytes)
        m.learning_rate.set(learner.optimizer.param_groups[0]["lr"])

    def _count_refusal(self, reason: str, message: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.refused.add(reason, message)

    def _device_memory(self) -> tuple[float, float]:
        device = self.learner.device
        if device.type != "cuda":
            return 0.0, 0.0
        return (float(torch.cuda.memory_allocated(device)),
                float(torch.cuda.memory_reserved(device)))


def serve(config: Config, fresh: bool = False) -> int:
    logs.configure(config.log.format, config.log.level)
    prometheus_client.disable_created_metrics()  # no *_created series: noise for dashboards
    try:
        return Daemon(config, fresh).run()
    except (IncompatibleState, StartupError, KeyError_) as e:
        logs.get().error("refusing to start", reason=str(e))
        return 2
