"""deploy/ against the real thing: a real `streamrnn serve`, fed with real text and a few
hostile messages, scraped by a real Prometheus server that loads the real alerts.yml.
Every query of the Grafana dashboard must return data, every alert expression must
evaluate (and, on this healthy daemon, not fire), and every metric an alert names must
have samples.

promtool (tests/test_deploy.py) proves the queries parse; only a server with data proves
that they select something: a typo in a label, a metric the daemon never exports, a
rate() over a window with too few samples, a histogram without observations."""
from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness import DaemonProcess, RawClient, free_port
from streamrnn.client import Producer
from streamrnn.tools.textdata import text_streams
from tools import require

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrnn.json"
METRIC_NAME = re.compile(r"\bstreamrnn_[a-z_]+")

# Grafana fills these in before a query reaches Prometheus. $__rate_interval is at least
# four scrape intervals (1 s here); 30 s holds plenty of samples once the wait is over.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "5m"}

# Hostile input, one of each per round: every one is refused, so
# streamrnn_messages_rejected_total keeps rising for these reasons.
HOSTILE = {
    "malformed": b"\xc1 not msgpack",
    "unknown_type": {"type": "launch", "id": 1},
    "token_out_of_range": {"type": "tokens", "id": 2, "stream": "hostile", "offset": 0,
                           "tokens": [1, 256]},
}


# ---- the files, read the way Grafana and Prometheus read them --------------------------
def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) for every target of every panel, rows' panels too."""
    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel.get("title", "?"), target["expr"],
                            target.get("legendFormat", "")))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def dashboard_variables() -> dict[str, dict]:
    return {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}


def fill_dashboard_variables(expr: str) -> str:
    """The query as Grafana sends it with job "streamrnn" and instance "All" selected."""
    variables = dashboard_variables()
    # the dashboard's own variables: every one used here must be one we know how to fill
    values = {"job": "streamrnn", "instance": ".*"}
    assert set(variables) == {"datasource", *values}, \
        f"dashboard variables changed: {sorted(variables)}; teach this test the new ones"
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unfilled variable in {expr!r}"
    return expr


def parse_alert_rules(text: str) -> dict[str, list[tuple[str, str]]]:
    """group name -> [(alert name, expr)] from alerts.yml's layout: `- name:` per group,
    `- alert:` per rule, `expr:` either on one line or a block scalar (`|`, `>-`, ...)
    whose lines are indented deeper than the `expr:` key. PyYAML is no dependency."""
    groups: dict[str, list[tuple[str, str]]] = {}
    group = alert = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if m := re.match(r"^\s*- name:\s*(\S+)\s*$", line):
            group = m.group(1)
            groups[group] = []
        elif m := re.match(r"^\s*- alert:\s*(\S+)\s*$", line):
            alert = m.group(1)
        elif m := re.match(r"^(\s*)expr:\s*(.*?)\s*$", line):
            assert group is not None and alert is not None, f"expr outside a rule: {line}"
            indent, value = len(m.group(1)), m.group(2)
            if value and value[0] in "|>":
                assert re.fullmatch(r"[|>][-+]?", value), f"unexpected block header {value}"
                block = []
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                # folded (>) or literal (|): the same PromQL either way
                value = "\n".join(part for part in block if part)
            else:
                value = value.strip("'\"") if value[:1] in "'\"" else value
            assert value, f"empty expr for {alert}"
            groups[group].append((alert, value))
            alert = None
    return groups


# ---- Prometheus ------------------------------------------------------------------------
class PrometheusServer:
    def __init__(self, workdir: Path, target: str):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.target = target
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> Path:
        # deploy/prometheus/prometheus.yml's structure with this test's target and a 1 s
        # rhythm; the scrape job keeps its name, which the alerts and the dashboard select
        source = SCRAPE_CONFIG.read_text()
        job = re.search(r"job_name:\s*(\w+)", source).group(1)
        assert job == "streamrnn"
        assert re.search(r"^rule_files:\s*\n\s*- alerts\.yml\s*$", source, re.M)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "rule_files:\n"
            f"  - {json.dumps(str(ALERTS))}\n"
            "scrape_configs:\n"
            f"  - job_name: {job}\n"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(self.target)}]\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 1s\n")
        return config

    def start(self, binary: str) -> "PrometheusServer":
        config = self.write_config()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready:\n{self.log()}")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422 carry the error as JSON
            body = json.loads(e.read())
        return body

    def query(self, expr: str) -> list[dict]:
        """An instant query that must succeed; its result vector (maybe empty)."""
        body = self.api("query", query=expr)
        assert body.get("status") == "success", f"{expr!r}: {body}"
        assert body["data"]["resultType"] == "vector", f"{expr!r}: {body['data']}"
        return body["data"]["result"]


# ---- input: real text from several producers' streams, and some hostile messages ------
class Feeder(threading.Thread):
    """Real text on a few streams at a pace the tiny model on a CPU nearly keeps up with
    (the ingest queue must stay far from StreamrnnQueueSaturated's 90%), and one round
    of hostile messages per `hostile_every` rounds: refusals keep rising, yet stay well
    under StreamrnnRejectionRateHigh's 5% of all messages whatever the machine's speed."""

    def __init__(self, endpoint: str, streams: int = 4, chunk: int = 64,
                 hostile_every: int = 50):
        super().__init__(daemon=True)
        self.endpoint, self.chunk, self.hostile_every = endpoint, chunk, hostile_every
        self.texts = text_streams(streams, 1 << 16)
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.refused: dict[str, int] = {}
        self.sent = 0

    def run(self) -> None:
        try:
            with Producer(self.endpoint, retry_seconds=30) as producer, \
                    RawClient(self.endpoint) as raw:
                round_ = 0
                while not self.stop_event.is_set():
                    begin = (round_ * self.chunk) % len(self.texts[0])
                    for i, text in enumerate(self.texts):
                        producer.send(f"text/{i}", text[begin:begin + self.chunk])
                        self.sent += self.chunk
                    if round_ % self.hostile_every == 0:
                        for reason, message in HOSTILE.items():
                            reply = raw.ask(message, timeout=10)
                            assert reply.get("type") == "nack", reply
                            assert reply.get("reason") == reason, reply
                            self.refused[reason] = self.refused.get(reason, 0) + 1
                    round_ += 1
                    time.sleep(0.05)
                producer.flush(timeout=30)
        except BaseException as e:  # reported by the test, not lost in the thread
            self.errors.append(e)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "feeder thread hangs"
        assert not self.errors, f"feeder failed: {self.errors!r}"


def wait_for(what: str, check, timeout: float, diagnose) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = check()
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout:g} s still {what}: {missing}\n{diagnose()}")
        time.sleep(0.5)


@pytest.mark.slow
def test_dashboard_and_alerts_against_real_prometheus(tmp_path: Path):
    binary = require("prometheus", "prometheus")
    targets = dashboard_targets()
    assert len(targets) >= 20
    rules = parse_alert_rules(ALERTS.read_text())
    alerts = [rule for group in rules.values() for rule in group]
    assert len(alerts) == len(re.findall(r"^\s*- alert:", ALERTS.read_text(), re.M)) >= 9

    # every stream's lines scored: the Surprise panels get data, not only zeros
    daemon = DaemonProcess(tmp_path, ["checkpoint.interval_seconds=2", "scores.all_streams=true"])
    instance = f"127.0.0.1:{daemon.metrics_port}"
    prometheus = PrometheusServer(tmp_path, instance)
    feeder = None
    try:
        daemon.start()
        feeder = Feeder(daemon.endpoint)
        feeder.start()
        prometheus.start(binary)

        def diagnose() -> str:
            return (f"--- prometheus log:\n{prometheus.log()[-3000:]}\n"
                    f"--- daemon log:\n{daemon.log()[-3000:]}\n"
                    f"--- feeder errors: {feeder.errors!r}")

        # the target is scraped, and rate() has samples to work on
        def not_scraped():
            up = prometheus.query('up{job="streamrnn"}')
            if [s["value"][1] for s in up] != ["1"]:
                return f"up = {up}"
            samples = prometheus.query('count_over_time(up{job="streamrnn"}[1m])')
            return None if int(samples[0]["value"][1]) >= 5 else f"{samples} samples"
        wait_for("not scraped", not_scraped, 60, diagnose)

        # every dashboard query returns data (a series; NaN or 0 is data, nothing is not)
        queries = [(title, fill_dashboard_variables(expr), legend)
                   for title, expr, legend in targets]

        def empty_panels():
            return [(title, expr) for title, expr, _ in queries if not prometheus.query(expr)]
        wait_for("without data", empty_panels, 60, diagnose)
        # and the labels its legend shows are in the series (else Grafana shows blanks)
        for title, expr, legend in queries:
            for series in prometheus.query(expr):
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                    assert label in series["metric"], \
                        f"{title}: legend {legend!r}, but {expr} gives {series['metric']}"

        # the series are this daemon's, and what the input must have moved, moved
        def value(expr: str) -> float:
            result = prometheus.query(expr)
            assert len(result) == 1, f"{expr}: {result}"
            assert result[0]["metric"].get("instance", instance) == instance, result
            return float(result[0]["value"][1])

        def moved():
            checks = {
                "tokens trained/s": value('sum(rate(streamrnn_tokens_trained_total'
                                          '{job="streamrnn"}[30s]))') > 0,
                "updates/s": value('sum(rate(streamrnn_updates_total[30s]))') > 0,
                "update latency p50": math.isfinite(value(
                    'histogram_quantile(0.5, sum by (le) (rate('
                    'streamrnn_update_duration_seconds_bucket[30s])))')),
                "checkpoint written": value(
                    'streamrnn_checkpoint_last_success_timestamp_seconds') > 0,
                "checkpoint duration p50": math.isfinite(value(
                    'histogram_quantile(0.5, sum by (le) (rate('
                    'streamrnn_checkpoint_duration_seconds_bucket[30m])))')),
                "active streams": value('streamrnn_active_streams') >= len(feeder.texts),
            }
            return [name for name, ok in checks.items() if not ok]
        wait_for("unmoved", moved, 30, diagnose)
        reasons = {s["metric"]["reason"] for s in prometheus.query(
            'sum by (reason) (rate(streamrnn_messages_rejected_total[30s])) > 0')}
        assert reasons == set(HOSTILE), reasons
        memory = prometheus.query('streamrnn_device_memory_bytes')
        assert {s["metric"]["kind"] for s in memory} == {"allocated", "reserved"}

        # the dashboard's variables: label_values(...) through Prometheus' label API
        variables = dashboard_variables()
        assert variables["job"]["query"]["query"] == "label_values(streamrnn_build_info, job)"
        body = prometheus.api("label/job/values", **{"match[]": "streamrnn_build_info"})
        assert body["status"] == "success" and body["data"] == ["streamrnn"], body
        assert variables["instance"]["query"]["query"] == \
            'label_values(streamrnn_build_info{job=~"$job"}, instance)'
        body = prometheus.api("label/instance/values",
                              **{"match[]": 'streamrnn_build_info{job=~"streamrnn"}'})
        assert body["status"] == "success" and body["data"] == [instance], body

        # every alert expression evaluates, and on this healthy daemon none is true; every
        # metric it names has samples (an alert over a missing metric never fires)
        for name, expr in alerts:
            assert 'job="streamrnn"' in expr, name
            assert prometheus.query(expr) == [], f"{name} would fire: {expr}"
            for metric in set(METRIC_NAME.findall(expr)):
                series = prometheus.query(f'{metric}{{job="streamrnn"}}')
                assert series, f"{name}: no samples of {metric}"
                assert {s["metric"]["instance"] for s in series} == {instance}

        # the server loaded every group and rule of alerts.yml and evaluates them cleanly
        def not_evaluated():
            body = prometheus.api("rules")
            assert body["status"] == "success", body
            loaded = {g["name"]: g for g in body["data"]["groups"]}
            assert set(loaded) == set(rules), sorted(loaded)
            problems = []
            for group_name, group in loaded.items():
                assert group["file"] == str(ALERTS), group["file"]
                assert [r["name"] for r in group["rules"]] == \
                    [name for name, _ in rules[group_name]]
                for rule in group["rules"]:
                    assert rule["type"] == "alerting"
                    assert rule["health"] in ("ok", "unknown"), rule  # unknown: not run yet
                    assert not rule.get("lastError"), rule
                    assert rule["state"] == "inactive", rule
                    if rule["health"] != "ok":
                        problems.append(rule["name"])
            return problems
        wait_for("not evaluated", not_evaluated, 10, diagnose)
        alerts_body = prometheus.api("alerts")
        assert alerts_body["status"] == "success" and alerts_body["data"]["alerts"] == []

        feeder.stop()
        assert feeder.sent > 0 and set(feeder.refused) == set(HOSTILE)
    finally:
        if feeder is not None and feeder.is_alive():
            feeder.stop_event.set()
            feeder.join(timeout=60)
        prometheus_status = prometheus.stop()
        daemon_status = daemon.stop()
    assert daemon_status == 0, daemon.log()[-3000:]
    assert prometheus_status == 0, prometheus.log()[-3000:]
