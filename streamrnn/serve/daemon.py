"""`streamrnn serve`: the long-running daemon (one process, or one rank of several).

    start:  learner, metrics, recovery, bind the ROUTER   (all built in __init__/start)
    loop:   read the socket -> tick (the ranks agree: cluster.py) -> train: (agree, log,
            step, read the socket) x updates_per_turn -> checkpoints (checkpointer.py)
            -> answer finished checkpoints -> housekeeping (idle flushes, forgetting)
    stop:   SIGTERM/SIGINT only set a flag (a second one exits at once); the loop ends
            its turn (every rank's, at the tick), then a final checkpoint and an ordered
            shutdown

One thread does everything that touches the model, so no locks: a predict request is
answered between two updates, while learning goes on. What each request gets is
handlers.py's; this file is lifecycle and the loop.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Callable, Mapping

import torch
import zmq

from .. import __version__, wire
from ..config import Config
from ..core.collective import Ranks
from ..core.learner import LearnResult, Learner
from . import auth, faults, logs
from .checkpointer import Checkpointer
from .cluster import Cluster, ClusterFault
from .generations import Generations
from .handlers import Deferred, Generating, Handlers, checkpoint_reply, nack
from .journal import Journal, LogFull, apply
from .metrics import Metrics
from .recovery import Recovery
from .replay import StopDuringRecovery
from .scores import ScoreFeed
from .source import Incoming, Source
from .statedir import StateDir, lock
from .systemd import Notifier
from .wal import WalSyncFailed

HOUSEKEEPING_SECONDS = 0.5
INTAKE_SECONDS = 0.25  # handling requests at most this long before training resumes
STATUS_SECONDS = 5.0
KEY_RELOAD_SECONDS = 30.0
PRUNE_SECONDS = 60.0  # the score feed forgets streams the learner forgot this often


class Daemon:
    def __init__(self, config: Config, fresh: bool = False,
                 clock: Callable[[], float] = time.monotonic, ranks: Ranks | None = None,
                 metrics: Metrics | None = None, environ: Mapping[str, str] | None = None):
        """`clock` (monotonic seconds) paces flushes, forgetting, checkpoints and rates:
        tests pass their own. `ranks`: the ranks torchrun started (Ranks.from_environment),
        None for one process. `metrics`: a registry of its own unless given. `environ`:
        where systemd's variables are read (os.environ unless given)."""
        self.config, self.fresh, self.clock = config, fresh, clock
        self.ranks = ranks if ranks is not None else Ranks()
        self.cluster = Cluster(config, self.ranks)
        self.log = logs.get("streamrnn.daemon")
        if self.cluster.distributed:
            self.log = self.log.bind(rank=self.ranks.rank)
            self.cluster.check_configs()  # before any rank touches its state
        self.stop_requested = False
        self.replaced_handlers: dict[int, object] = {}
        # one voice to each machine's systemd: its first rank (rank 0 on one machine),
        # whose loop is in step with every rank's (a rank that hangs stalls it at the
        # next collective, so its watchdog pings stop too)
        environ = dict(os.environ if environ is None else environ)
        if self.cluster.distributed:
            environ.pop("WATCHDOG_PID", None)  # the launcher's pid: that rank pings instead
            if environ.get("LOCAL_RANK", str(self.ranks.rank)) != "0":
                environ.pop("NOTIFY_SOCKET", None)
        self.notifier = Notifier(environ)
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
        self.paused_for_log = False  # a rank's log is full: no rank trains
        self.next_housekeeping = self.next_status = self.next_key_reload = 0.0
        self.next_prune = 0.0
        self.next_summary = clock() + config.log.summary_seconds
        self.learner = Learner(config, self.ranks)
        self.metrics = metrics if metrics is not None else Metrics()
        self.ranks.timer = time.perf_counter
        self.ranks.observe = lambda kind, seconds: \
            self.metrics.collective_seconds.labels(kind).observe(seconds)
        self.statedir = StateDir(config.checkpoint.resolved_dir())
        self.locks = self._lock()  # before anything in the folder is touched
        self.journal = Journal(config, self.metrics, self.log, clock)
        self.checkpointer = Checkpointer(config, self.learner, self.cluster, self.statedir,
                                         self.journal, self.metrics, self.log, clock)
        self.generations = Generations(self.metrics)
        self.handlers = Handlers(config, self.learner, self.journal, self.checkpointer,
                                 self.metrics, clock, self.cluster, self.generations)
        self.counted = (0, 0)  # streams flushed and forgotten, as the metrics have them
        self.source: Source | None = None
        self.feed: ScoreFeed | None = None
        self.context: zmq.Context | None = None
        self.authenticator = None
        self.metrics_server = None

    def _lock(self) -> list:
        """The state folder (the process, or rank 0: no other daemon may use it), and
        this rank's log."""
        held = []
        if self.ranks.rank == 0:
            held.append(lock(self.statedir.root / "lock", "the state folder"))
        own = self.statedir.log_folder(self.ranks.rank, self.ranks.world_size)
        try:
            held.append(lock(self.statedir.lock_path(own), "the log of this rank"))
        except BaseException:
            for lock_file in held:
                lock_file.close()
            raise
        return held

    # ---- lifecycle ---------------------------------------------------------------------
    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.replaced_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            try:
                self.start()
            except StopDuringRecovery:
                return 0  # nothing written: the next start replays again
            while not self.turn():
                pass
            self.notifier.stopping()
            self.source.close()  # no more input: everything acked is in the log
            # the next start replays nothing
            if self.checkpointer.checkpoint_now(ping=self.notifier.ping) is None:
                self.log.error("final checkpoint failed; the next start replays the log")
        finally:
            self.shutdown()
            for sig, handler in self.replaced_handlers.items():
                signal.signal(sig, handler)
        return 0

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # the second one: the user does not want to wait
            os._exit(128 + signum)  # what was acked is in the log; the next start replays
        self.stop_requested = True  # the loop notices within one turn
        if self.ranks.distributed:
            # torchrun waits cluster.shutdown_seconds for a rank after SIGTERM when told
            # to stop, but 30 s when it restarts every rank after a failure: a rank that
            # cannot end its turn (hung) ends itself at the configured bound either way
            deadline = threading.Timer(self.config.cluster.shutdown_seconds,
                                       self._stop_overdue)
            deadline.daemon = True
            deadline.start()

    def _stop_overdue(self) -> None:
        print(f"streamrnn rank {self.ranks.rank}: not stopped cluster.shutdown_seconds "
              f"({self.config.cluster.shutdown_seconds:g} s) after SIGTERM; exiting (what "
              "it acknowledged is in its log)", file=sys.stderr, flush=True)
        os._exit(1)

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
        m.world_size.set(self.ranks.world_size)
        m.rank.set(self.ranks.rank)
        m.generation.set(self.cluster.agree_generation())
        self.context = zmq.Context()
        # CURVE: one gatekeeper for the ingest and the score feed, up before either binds
        self.authenticator = auth.start(self.context, c.ingest.curve_secret_key,
                                        c.ingest.curve_allowed_keys)
        if c.scores.endpoint:  # before the replay: a watch that reconnects sees it too
            self.feed = ScoreFeed(c, self.cluster.bind_endpoint(c.scores.endpoint),
                                  self.context, m)
            learner.scorer = self.feed
        # before anyone can send: state first (systemd hears that a long replay goes on)
        Recovery(c, learner, self.cluster, self.statedir, self.journal, self.checkpointer,
                 m, self.log).run(self.fresh, should_stop=lambda: self.stop_requested,
                                  progress=self._recovering)
        self.counted = (learner.streams.num_flushed, learner.streams.num_forgotten)
        faults.poison(learner)
        now = self.clock()
        for stream in learner.streams.ids:  # recovered streams still owe a flush
            if stream not in learner.streams.ended:
                self.handlers.activity.input(stream, now)
            if learner.streams.untrained(stream) == 0 or \
                    learner.streams.flushing[learner.streams.row_of[stream]]:
                self.handlers.activity.unflushed.pop(stream, None)
        metrics_port = self.cluster.metrics_port()
        if metrics_port:
            self.metrics_server = m.serve(c.metrics.address, metrics_port)
        self.source = Source(dataclasses.replace(c.ingest,
                                                 endpoint=self.cluster.bind_endpoint()),
                             self.context)
        # also a barrier: every rank is bound and recovered once this returns
        self.cluster.share_endpoints(self.source.endpoint,
                                     self.feed.endpoint if self.feed else "")
        self._publish()
        ready = f"listening on {self.source.endpoint}" + (
            f" (rank 0 of {self.ranks.world_size}: every rank is ready)"
            if self.cluster.distributed else "")
        self.notifier.ready(ready)
        self.log.info("listening", endpoint=self.source.endpoint,
                      curve="on" if self.source.curve else "off",
                      scores=self.feed.endpoint if self.feed else "off",
                      metrics=(f"http://{c.metrics.address}:{metrics_port}/metrics"
                               if metrics_port else "off"), device=str(learner.device),
                      **({"ranks": self.ranks.world_size, "endpoints": self.cluster.endpoints}
                         if self.cluster.distributed else {}))

    def _recovering(self, line: str) -> None:
        """A long replay goes on: systemd hears it, at start (the start timeout moves
        back) and after torchrun restarted the ranks of a running service (the watchdog
        counts from the last rank 0's last ping)."""
        self.notifier.extend_start(60, line)
        self.notifier.ping()

    def shutdown(self) -> None:
        started = self.source is not None
        if started:
            self.log.info("stopping")
            self.source.close()
        if self.feed is not None:
            self.learner.scorer = None
            self.feed.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.context is not None:
            self.context.term()
        self.checkpointer.close()
        self.journal.close()
        for lock_file in self.locks:
            lock_file.close()  # releases the folder
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
    def turn(self) -> bool:
        """One turn: take what the network has, agree with the other ranks, train a
        bounded amount, look after things. True once the daemon is to stop (every rank
        stops at the same tick)."""
        faults.maybe_hang("turn")
        self.notifier.ping()  # from this loop only: if it hangs, systemd restarts us
        busy = self.training_pending or self.inbox or self.generations
        ready = self.inbox or self.source.socket.poll(0 if busy else 50, zmq.POLLIN)
        started = time.perf_counter()  # the turn's work, not its wait for input
        if ready:
            self.intake()
        # what this rank wants (to stop, a checkpoint ...) and its log has no room,
        # summed over the ranks: every rank then does the same
        tally = self.cluster.tick({"stop": self.stop_requested,
                                   "log_blocked": self.journal.full_since is not None,
                                   "check": self.cluster.check_due(),
                                   **self.checkpointer.tick_fields()})
        if tally["stop"]:
            self.stop_requested = True
            return True
        if bool(tally["log_blocked"]) != self.paused_for_log and self.cluster.distributed:
            self.paused_for_log = bool(tally["log_blocked"])
            if self.paused_for_log:  # (the full rank's own log says which disk)
                self.log.warning("training paused: a rank's write-ahead log is full",
                                 ranks_full=tally["log_blocked"])
            else:
                self.log.info("training resumes: every rank's log has room")
        self.train()
        for envelope, reply in self.generations.advance():
            self.source.reply(envelope, reply)
        if tally["check"]:
            self.cluster.check_weights(self.learner.model)
        self.journal.sync_if_due()
        self.checkpointer.after_tick(tally)  # a finished checkpoint; a due one starts
        self._answer_checkpoints()
        now = self.clock()
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_SECONDS
            self.housekeeping(now)
        self._publish()
        self.metrics.turn_seconds.observe(time.perf_counter() - started)
        return False

    def train(self) -> None:
        """Up to train.updates_per_turn updates (full windows, and the rest of the
        streams whose flush was asked for). Each is agreed by the ranks, then logged,
        then run (it is a pure function of what the logs hold before it, so a replay
        makes the same one); between two the socket is read again, so an ack waits one
        update at most."""
        max_updates = self.config.train.updates_per_turn
        started, num_updates = time.perf_counter(), 0
        while num_updates < max_updates:
            plan = self.learner.next_update()
            go, num_targets = self.cluster.agree_update(
                plan is not None, plan.num_targets if plan is not None else 0,
                log_blocked=not self.journal.has_room())
            if not go:
                break  # no window anywhere, or a log that cannot record it
            faults.maybe_crash("global_step")
            record = self._log_step(num_targets)
            if record is None:
                break  # no update a log cannot record: again once it has room
            update_started = time.perf_counter()
            # an exception here ends the daemon: the log says this update ran, and the
            # next start replays it, so the model served always matches the log
            apply(self.learner, record, plan)
            # on a GPU this is host time: the queue of launched work makes it the
            # device's own once the loop runs ahead by a few updates
            self.metrics.update_seconds.observe(time.perf_counter() - update_started)
            if plan is None:
                self.metrics.idle_rank_updates.inc()
            num_updates += 1
            self.notifier.ping()
            self.intake()
        self.training_pending = num_updates == max_updates
        self.account(self.learner.settle(), time.perf_counter() - started)

    def _log_step(self, num_targets: int) -> dict | None:
        """Log the agreed update before it runs; None if it may not run. With several
        ranks every rank must have logged it (a second small all-reduce): a rank whose
        disk just filled has not, and the others cancel theirs, so no rank runs a step
        another could not replay."""
        try:
            record = self.journal.log_step(num_targets)
        except LogFull:
            record = None
        if self.cluster.distributed and not self.cluster.all_logged(record is not None):
            if record is not None and not self.journal.cancel_step():
                raise ClusterFault("the write-ahead log could not record that a step was "
                                   "cancelled (the disk is full here too)")
            return None
        return record

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
            self.journal.commit()
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
        if request.request_id is not None and request.type != "tokens" and \
                (working := self._working(incoming.envelope, request.request_id)):
            self.outbox.append((incoming.envelope, working))  # asked again: runs once
            return
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
        if isinstance(reply, Generating):
            self.generations.add(incoming.envelope, request.request_id, request.stream,
                                 reply.generation)
            return
        if reply.get("type") == "nack":
            self._count_refusal(reply["reason"], reply["message"])
        self.outbox.append((incoming.envelope, reply))

    def _working(self, envelope: list[bytes], request_id) -> dict | None:
        """The answer to a request this producer asked again (the same id) while the
        first is still being worked on (a generation, a checkpoint), else None."""
        if any(a[0] == envelope and a[1] == request_id for a in self.awaiting):
            return {"type": "working", "id": request_id, "request": "checkpoint",
                    "progress": None}
        return self.generations.working(envelope, request_id)

    def _answer_checkpoints(self) -> None:
        """Reply to `checkpoint` requests whose write is done (durable, or failed)."""
        done = self.checkpointer.num_finished
        ready = [a for a in self.awaiting if a[2] <= done]
        if not ready:
            return
        self.awaiting = [a for a in self.awaiting if a[2] > done]
        for envelope, request_id, ticket in ready:
            reply = checkpoint_reply(self.checkpointer.results.get(ticket))
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
        idle = activity.idle(activity.unflushed, now, train.flush_after_seconds or math.inf)
        if idle and not self.handlers.flush(idle):
            for stream in idle:  # the log is full: again once it has room
                activity.flush_soon(stream)
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
        if self.feed is not None and now >= self.next_prune:
            self.next_prune = now + PRUNE_SECONDS
            self.feed.prune(self.learner.streams.row_of)
        if self.authenticator is not None and now >= self.next_key_reload:
            self.next_key_reload = now + KEY_RELOAD_SECONDS  # new keys need no restart
            auth.reload(self.authenticator, self.config.ingest.curve_allowed_keys)
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

    def _publish(self) -> None:
        """Gauges, set from the loop once per turn: a scrape (on the metrics thread) only
        reads numbers, so nothing it does can fail or race the loop."""
        m, learner = self.metrics, self.learner
        m.active_streams.set(len(learner.streams.ids))
        m.queue_tokens.set(learner.num_untrained)
        m.resident_streams.set(learner.streams.states.num_resident)
        m.spilled_streams.set(learner.streams.states.num_spilled)
        m.wal_bytes.set(self.journal.wal_bytes)
        flushed, forgotten = learner.streams.num_flushed, learner.streams.num_forgotten
        m.flushes.inc(flushed - self.counted[0])  # (counted by the table as they happen)
        m.streams_ended.inc(forgotten - self.counted[1])
        self.counted = (flushed, forgotten)
        if self.feed is not None:
            self.feed.read_subscriptions()  # who watches, even while nothing trains
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
