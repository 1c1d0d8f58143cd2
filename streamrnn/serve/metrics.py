"""Every Prometheus metric of the daemon, defined in one place, on a private registry.

Base units, `_total` counters, histograms (not summaries), no per-stream labels: the
number of streams is unbounded. rate(streamrnn_prequential_bits_total) over
rate(streamrnn_tokens_trained_total) is the live bits/token over any window.
Counters count since the process started, as Prometheus expects; the lifetime totals
of the learned state are in `streamrnn status --json`.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               ProcessCollector)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from ..config import StartupError
from ..wire import REASONS, REQUEST_TYPES


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tokens_received = Counter(
            "streamrnn_tokens_received", "Tokens accepted from producers (new, not "
            "duplicates).", registry=r)
        self.tokens_duplicate = Counter(
            "streamrnn_tokens_duplicate", "Tokens received again at an offset already "
            "accepted, acknowledged and not trained twice.", registry=r)
        self.tokens_trained = Counter(
            "streamrnn_tokens_trained", "Targets trained (a stream of N tokens gives N-1 "
            "once flushed); those of skipped updates (non-finite loss) are not.", registry=r)
        self.bits = Counter(
            "streamrnn_prequential_bits", "Prequential bits over the trained targets, each "
            "measured before the update that trains it.", registry=r)
        self.updates = Counter("streamrnn_updates", "Updates run (each trains one window "
                               "of up to train.max_batch_streams streams).", registry=r)
        self.nonfinite_updates = Counter(
            "streamrnn_nonfinite_loss_updates", "Updates whose loss or gradient was NaN or "
            "infinite: their step was skipped, weights and optimizer unchanged.", registry=r)
        self.messages = Counter("streamrnn_messages", "Messages received, by request "
                                "type.", ["type"], registry=r)
        self.rejected = Counter("streamrnn_messages_rejected", "Messages refused (nack), by "
                                "reason.", ["reason"], registry=r)
        # what ZeroMQ reports for a client without CURVE varies: a mechanism mismatch
        # (protocol), the client hanging up mid-handshake (other), or both at once
        self.handshake_failures = Counter(
            "streamrnn_handshake_failures", "Failed handshakes on the ingest endpoint (CURVE "
            "on), by kind: auth (a CURVE key not in ingest.curve_allowed_keys), protocol (a "
            "handshake ZeroMQ rejects, e.g. a client without CURVE), other (the peer hung "
            "up during the handshake, e.g. a client without CURVE). One refused attempt may "
            "count under both protocol and other.", ["kind"], registry=r)
        self.busy = Counter("streamrnn_busy_replies", "Messages answered busy and not "
                            "taken (the queue or the log full, or too many generations).",
                            registry=r)
        self.flushes = Counter("streamrnn_stream_flushes", "Streams whose last targets were "
                               "trained by a flush (idle or requested).", registry=r)
        self.streams_ended = Counter(
            "streamrnn_streams_forgotten", "Ended streams (end request) forgotten once "
            "their last targets were trained: their ids are free again.", registry=r)
        self.update_seconds = Histogram(
            "streamrnn_update_duration_seconds", "Wall time of each update on the host (on a "
            "GPU, once the loop runs ahead, the device's time per update).",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.turn_seconds = Histogram(
            "streamrnn_turn_duration_seconds", "Wall time of one turn of the main loop "
            "(intake, training, generation slices, housekeeping): acks and watchdog pings "
            "wait at most about this long.",
            buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.generated_tokens = Counter(
            "streamrnn_generated_tokens", "Tokens sampled for generate requests.", registry=r)
        self.updates_per_turn = Histogram(
            "streamrnn_turn_updates", "Updates run in one turn of the main loop.",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_streams = Histogram(
            "streamrnn_update_streams", "Streams in one update (batch width).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
        self.active_streams = Gauge("streamrnn_active_streams", "Streams the daemon holds.",
                                    registry=r)
        self.resident_streams = Gauge("streamrnn_resident_streams", "Streams whose state "
                                      "is on the device.", registry=r)
        self.spilled_streams = Gauge("streamrnn_spilled_streams", "Idle streams whose state "
                                     "waits in host memory (train.max_resident_streams).",
                                     registry=r)
        self.queue_tokens = Gauge("streamrnn_ingest_queue_tokens", "Received tokens not "
                                  "trained yet.", registry=r)
        self.queue_limit = Gauge("streamrnn_ingest_queue_limit_tokens", "The queue's "
                                 "limit now: ingest.max_queued_tokens, or fewer, "
                                 "ingest.max_queued_seconds of training at the measured "
                                 "rate; beyond it producers get busy.", registry=r)
        self.learning_rate = Gauge("streamrnn_learning_rate", "Current learning rate.",
                                   registry=r)
        self.grad_norm = Gauge("streamrnn_grad_norm", "Gradient norm before clipping, of "
                               "the latest update (read twice a second).", registry=r)
        self.start_time = Gauge("streamrnn_start_time_seconds", "When this process started "
                                "(Unix time).", registry=r)
        self.build = Info("streamrnn_build", "Version, torch and device.", registry=r)
        self.checkpoint_last_success = Gauge(
            "streamrnn_checkpoint_last_success_timestamp_seconds", "When the newest "
            "checkpoint was written (Unix time; the loaded one's at start).", registry=r)
        self.checkpoint_seconds = Histogram(
            "streamrnn_checkpoint_duration_seconds", "Time to write a checkpoint.",
            buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.checkpoint_failures = Counter(
            "streamrnn_checkpoint_failures", "Checkpoint writes that failed (the previous "
            "one stays).", registry=r)
        self.checkpoint_load_failures = Counter(
            "streamrnn_checkpoint_load_failures", "Checkpoints found unreadable at start "
            "(an older one was used).", registry=r)
        self.wal_bytes = Gauge("streamrnn_wal_bytes", "Size of the write-ahead log on disk.",
                               registry=r)
        self.wal_failures = Counter(
            "streamrnn_wal_write_failures", "Records the write-ahead log could not take "
            "(disk full); the input was answered busy.", registry=r)
        self.recovery_replayed_tokens = Counter(
            "streamrnn_recovery_replayed_tokens", "Tokens replayed from the write-ahead log "
            "at start.", registry=r)
        # several ranks (each serves its own /metrics; one process: rank 0 of 1, no
        # collectives). updates_total is the same on every rank: totals take max, not sum
        self.collective_seconds = Histogram(
            "streamrnn_collective_seconds", "Time waiting in all-reduces, by kind: agree "
            "(the small agreement each tick and update) and gradients (the flat gradient "
            "sum).", ["kind"],
            buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
                     1, 2.5, 5, 10), registry=r)
        self.world_size = Gauge("streamrnn_cluster_world_size", "Ranks in the cluster.",
                                registry=r)
        self.rank = Gauge("streamrnn_cluster_rank", "This process's rank.", registry=r)
        self.generation = Gauge("streamrnn_cluster_generation", "Changes on every start of "
                                "the cluster (topology replies carry it).", registry=r)
        self.idle_rank_updates = Counter(
            "streamrnn_idle_rank_updates", "Global updates this rank joined with no window "
            "of its own (it added zeros).", registry=r)
        # the score feed (serve/scores.py); lines of watched streams only, unless
        # scores.all_streams
        self.scores_published = Counter(
            "streamrnn_scores_published", "Score records sent on the score feed (line and "
            "tokens records).", registry=r)
        self.scores_dropped = Counter(
            "streamrnn_scores_dropped", "Score records dropped: a subscriber's queue "
            "(scores.send_queue) was full. Training never waits for a subscriber.",
            registry=r)
        self.score_subscriptions_refused = Counter(
            "streamrnn_score_subscriptions_refused", "Frames on the score feed that were "
            "not a subscription, or subscriptions past the limit of topics held.",
            registry=r)
        self.score_topics = Gauge("streamrnn_score_topics", "Topics subscribed to on the "
                                  "score feed.", registry=r)
        self.line_bits_per_token = Histogram(
            "streamrnn_line_bits_per_token", "Bits per token of each scored line (the "
            "lines of watched streams, or of all with scores.all_streams).",
            buckets=(.25, .5, .75, 1, 1.5, 2, 3, 4, 5, 6, 8), registry=r)
        self.surprising_lines = Counter(
            "streamrnn_surprising_lines", "Scored lines at or above scores.alert_quantile "
            "among their stream's recent lines.", registry=r)
        for kind in ("agree", "gradients"):
            self.collective_seconds.labels(kind)
        self.world_size.set(1)
        self.start_time.set(time.time())
        for reason in REASONS:
            self.rejected.labels(reason)  # every series exists from the start, at 0
        for kind in REQUEST_TYPES:
            self.messages.labels(kind)
        for kind in ("auth", "protocol", "other"):
            self.handshake_failures.labels(kind)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, fds
        self.grad_norm.set(float("nan"))

    def watch_device(self, memory: Callable[[], tuple[float, float]]) -> None:
        """GPU memory (allocated, reserved) in bytes, read at scrape time; 0 on a CPU."""
        self.registry.register(_DeviceMemory(memory))

    def serve(self, address: str, port: int):
        """Serve /metrics on a thread; returns (server, thread) for shutdown. An address
        or port that cannot be bound is a StartupError in one line."""
        try:
            return start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:  # in use, not this host's, or a name that does not resolve
            reason = e.strerror or str(e)
            raise StartupError(f"cannot bind metrics.address:metrics.port {address}:{port}: "
                               f"{reason[:1].lower()}{reason[1:]}") from None


class _DeviceMemory:
    def __init__(self, read: Callable[[], tuple[float, float]]):
        self.read = read

    def collect(self):
        allocated, reserved = self.read()
        family = GaugeMetricFamily("streamrnn_device_memory_bytes", "Accelerator memory "
                                   "held by torch (0 on a CPU).", labels=["kind"])
        family.add_metric(["allocated"], allocated)
        family.add_metric(["reserved"], reserved)
        yield family
