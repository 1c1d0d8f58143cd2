"""deploy/ as operators use it, checked with the real tools: systemd-analyze (the unit),
promtool (the scrape config, the alert rules and their unit tests), the daemon's own
metrics registry (every metric the dashboard and the alerts name must exist) and its
config loader (the example config)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

import streamrnn
from streamrnn.cli import build_parser
from streamrnn.config import Config
from streamrnn.serve.metrics import Metrics
from tools import promtool, require

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "streamrnn.service"
DROPINS = DEPLOY / "streamrnn.service.d"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrnn.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamrnn.yaml"

METRIC_NAME = re.compile(r"\bstreamrnn_[a-zA-Z0-9_]+")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def unit_settings(text: str) -> dict[str, list[str]]:
    """Section.Key -> values, in order (a key may repeat), comments left out."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


# ---- the systemd unit -----------------------------------------------------------------
DROPIN_NAMES = sorted(p.name for p in DROPINS.glob("*.conf"))
# verify and security read the drop-ins in NAME.service.d next to the unit: each one
# alone, all of them together (as an install with CURVE and several ranks has), none
DROPIN_SETS = [[], *([name] for name in DROPIN_NAMES), DROPIN_NAMES]
DROPIN_IDS = ["unit", *DROPIN_NAMES, "all"]


def install_unit(folder: Path, dropins: list[str]) -> Path:
    """The unit with these drop-ins in `folder`, every ExecStart pointing at the
    streamrnn this test runs, since `verify` checks that the binary exists."""
    binary = Path(sys.executable).parent / "streamrnn"
    assert binary.exists(), f"{binary} missing: install the project (pip install -e .)"
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={binary}",
                          UNIT.read_text(), flags=re.M)
    assert count == 1, "expected exactly one ExecStart= line"
    (folder / UNIT.name).write_text(text)
    (folder / DROPINS.name).mkdir()
    for name in dropins:
        # an empty ExecStart= (the reset before a drop-in's own) stays as it is
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={binary}",
                      (DROPINS / name).read_text(), flags=re.M)
        (folder / DROPINS.name / name).write_text(text)
    return folder / UNIT.name


@pytest.fixture
def installable_unit(tmp_path: Path) -> Path:
    """The unit with all its drop-ins, in a temporary folder."""
    return install_unit(tmp_path, DROPIN_NAMES)


def test_the_dropins_are_there():
    assert {"curve.conf", "ranks.conf"} <= set(DROPIN_NAMES)


@pytest.mark.parametrize("dropins", DROPIN_SETS, ids=DROPIN_IDS)
@pytest.mark.parametrize("man", [[], ["--man=no"]], ids=["man", "no-man"])
def test_unit_verifies_without_a_word(tmp_path: Path, man: list[str], dropins: list[str]):
    # verify exits 0 on unknown keys and unparsable values and only warns: any output
    # at all is a failure. Drop-ins next to the unit are checked too.
    unit = install_unit(tmp_path, dropins)
    out = run(require("systemd-analyze", "systemd"), "verify", *man, unit)
    assert (out.returncode, out.stderr, out.stdout) == (0, "", "")


@pytest.mark.parametrize("dropin", ["curve.conf", "ranks.conf"])
def test_unit_verify_catches_mistakes(installable_unit: Path, dropin: str):
    # the test above would be worthless if verify stayed silent on a typo
    path = installable_unit.parent / DROPINS.name / dropin
    path.write_text(path.read_text() + "ProtectSytem=strict\n")
    out = run(require("systemd-analyze", "systemd"), "verify", installable_unit)
    assert "Unknown key 'ProtectSytem'" in out.stderr


def test_unit_verify_reads_the_ranks_dropin(installable_unit: Path):
    # ranks.conf must reset the unit's ExecStart before it sets its own: a second one
    # is refused (only Type=oneshot may have several), which verify reports
    path = installable_unit.parent / DROPINS.name / "ranks.conf"
    path.write_text(re.sub(r"^ExecStart=\n", "", path.read_text(), flags=re.M))
    out = run(require("systemd-analyze", "systemd"), "verify", installable_unit)
    assert "more than one ExecStart=" in out.stderr


def exposure(unit: Path) -> float:
    out = run(require("systemd-analyze", "systemd"), "security", "--offline=yes", unit)
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
    assert found, out.stdout + out.stderr
    return float(found.group(1))


def test_unit_exposure_is_low():
    assert exposure(UNIT) < 3.0


@pytest.mark.parametrize("dropins", DROPIN_SETS[1:], ids=DROPIN_IDS[1:])
def test_dropins_keep_the_exposure(tmp_path: Path, dropins: list[str]):
    # security reads the drop-ins next to the unit (checked: one that adds hardening
    # lowers the score), and none of ours loosens anything
    assert exposure(install_unit(tmp_path, dropins)) == exposure(UNIT)
    stricter = tmp_path / "stricter"
    stricter.mkdir()
    unit = install_unit(stricter, dropins)
    (unit.parent / DROPINS.name / "zz-test.conf").write_text(
        "[Service]\nPrivateNetwork=yes\n")
    assert exposure(unit) < exposure(UNIT)


def test_unit_keeps_what_the_daemon_and_cuda_need():
    settings = unit_settings(UNIT.read_text())
    service = {k.split(".", 1)[1]: v[-1] for k, v in settings.items()
               if k.startswith("Service.")}
    # rank 0 of `serve --nproc N`, a child of the launcher, notifies for every rank;
    # SIGTERM goes to the launcher alone, which passes it on to each rank once
    assert service["Type"] == "notify" and service["NotifyAccess"] == "all"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert service["StateDirectory"] == "streamrnn"  # $STATE_DIRECTORY: checkpoint.dir
    assert service["Restart"] == "on-failure" and service["WatchdogSec"] == "60"
    # stop: finish the update, write the final checkpoint; start: replay the log
    assert int(service["TimeoutStopSec"]) >= 300 and int(service["TimeoutStartSec"]) >= 600
    # these break CUDA / PyTorch: /dev/nvidia* hidden, JIT code refused, /proc/cpuinfo gone
    assert service.get("PrivateDevices", "no") == "no"
    assert service.get("MemoryDenyWriteExecute", "no") == "no"
    assert service.get("ProcSubset", "all") == "all"
    # the command line is one the CLI accepts
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name == "streamrnn"
    args = build_parser().parse_args(command[1:])
    assert args.config == "/etc/streamrnn/config.toml"


def merged_service(*dropins: str) -> dict[str, list[str]]:
    """Service.KEY -> values of the unit with these drop-ins, as systemd merges them:
    later lines add to a list setting, an empty assignment resets it."""
    merged: dict[str, list[str]] = {}
    for text in [UNIT.read_text()] + [(DROPINS / d).read_text() for d in dropins]:
        for key, values in unit_settings(text).items():
            if key.startswith("Service."):
                for value in values:
                    merged[key] = [] if value == "" else merged.get(key, []) + [value]
    return merged


def test_ranks_dropin_runs_the_units_command_as_several_ranks():
    unit = shlex.split(unit_settings(UNIT.read_text())["Service.ExecStart"][-1])
    settings = unit_settings((DROPINS / "ranks.conf").read_text())
    assert settings["Service.ExecStart"][0] == ""  # resets the unit's, then its own
    service = merged_service("ranks.conf")
    assert len(service["Service.ExecStart"]) == 1
    command = shlex.split(service["Service.ExecStart"][0])
    args = build_parser().parse_args(command[1:])
    assert args.nproc >= 2 and args.config == "/etc/streamrnn/config.toml"
    # the same command as the unit's, with --nproc added: the two cannot drift apart
    assert command[:len(unit)] == unit and command[len(unit):] == ["--nproc", str(args.nproc)]
    # it changes nothing else: how the service is notified, stopped, hardened stays
    assert set(settings) == {"Service.ExecStart"}
    # and without it the daemon is one process
    assert build_parser().parse_args(unit[1:]).nproc == 1


@pytest.mark.parametrize("dropins", DROPIN_SETS, ids=DROPIN_IDS)
def test_ranks_get_their_final_checkpoint_before_systemd_kills_them(dropins: list[str]):
    # after SIGTERM the launcher gives the ranks cluster.shutdown_seconds, then kills
    # them; systemd kills everything left after TimeoutStopSec: that must come later,
    # with time for the launcher to exit
    stop = int(merged_service(*dropins)["Service.TimeoutStopSec"][-1])
    config = streamrnn.load_config(DEPLOY / "config.toml")
    assert config.cluster.shutdown_seconds + 30 <= stop


def test_curve_dropin_loads_the_key_as_a_credential():
    settings = unit_settings((DROPINS / "curve.conf").read_text())
    assert settings["Service.LoadCredential"] == [
        "curve-server.key_secret:/etc/streamrnn/keys/server.key_secret"]


def test_sysusers_creates_the_service_user(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    out = run(require("systemd-sysusers", "systemd"), f"--root={tmp_path}",
              DEPLOY / "streamrnn.sysusers")
    assert out.returncode == 0, out.stderr
    users = {line.split(":")[0]: line.split(":")
             for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    service = unit_settings(UNIT.read_text())
    assert users[service["Service.User"][-1]][5:] == ["/var/lib/streamrnn",
                                                      "/usr/sbin/nologin"]
    assert (tmp_path / "etc" / "group").read_text().startswith(
        service["Service.Group"][-1] + ":")


# ---- the example config ---------------------------------------------------------------
def test_example_config_loads(monkeypatch: pytest.MonkeyPatch):
    config = streamrnn.load_config(DEPLOY / "config.toml")
    assert config.checkpoint.keep >= 2
    assert config.metrics.address == "127.0.0.1" and config.metrics.port == 9108
    # checkpoint.dir empty: the unit's StateDirectory= decides where state lives
    assert config.checkpoint.dir == ""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/streamrnn")
    assert config.checkpoint.resolved_dir() == "/var/lib/streamrnn"
    sections = re.findall(r"^\[(\w+)\]", (DEPLOY / "config.toml").read_text(), re.M)
    assert sections == list(Config.__dataclass_fields__)


def test_the_log_preset_loads_and_scores_every_stream():
    """deploy/logs.toml: the small model README measured for one live log (1x192,
    TBPTT(64, 64)), every stream's lines scored so the surprise alert sees them."""
    config = streamrnn.load_config(DEPLOY / "logs.toml")
    assert (config.model.num_layers, config.model.hidden_size) == (1, 192)
    assert (config.train.k1, config.train.k2) == (64, 64)
    assert config.scores.all_streams and config.scores.resolved_line_token(256) == 10


# ---- Prometheus -----------------------------------------------------------------------
def test_prometheus_config_is_valid():
    # rule_files are relative to prometheus.yml: this also checks alerts.yml
    out = run(promtool(), "check", "config", PROMETHEUS / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


def test_alert_rules_are_valid():
    out = run(promtool(), "check", "rules", PROMETHEUS / "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests():
    out = run(promtool(), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr


def alert_names() -> list[str]:
    # PyYAML is no dependency of streamrnn: the files are regular enough for a regex
    return re.findall(r"^\s*- alert:\s*(\w+)\s*$", (PROMETHEUS / "alerts.yml").read_text(),
                      re.M)


def test_every_alert_has_a_firing_test():
    alerts = alert_names()
    assert len(alerts) == len(set(alerts)) >= 9
    tests = (PROMETHEUS / "alerts_test.yml").read_text()
    tested = set(re.findall(r"alertname:\s*(\w+)", tests))
    assert set(alerts) <= tested
    # and each one is expected to fire somewhere, not only to stay quiet
    firing = set(re.findall(r"alertname:\s*(\w+)\n\s*eval_time:\s*\S+\n\s*exp_alerts:\s*\n"
                            r"\s*- exp_labels:", tests))
    assert set(alerts) <= firing, set(alerts) - firing
    for alert in alerts:
        block = re.search(rf"- alert: {alert}\n(.*?)(?=\n\s*- alert:|\Z)",
                          (PROMETHEUS / "alerts.yml").read_text(), re.S).group(1)
        assert re.search(r"severity: (critical|warning)", block), alert
        assert "summary:" in block and "description:" in block, alert


def test_prometheus_config_for_several_ranks_is_valid(tmp_path: Path):
    # the commented example for `serve --nproc 2`, put in place of the single target
    config = (PROMETHEUS / "prometheus.yml").read_text()
    single = '    static_configs:\n      - targets: ["127.0.0.1:9108"]\n'
    assert config.count(single) == 1
    example = [line.replace("    # ", "    ", 1) for line in config.splitlines()
               if re.match(r"^    #( static_configs:|   - targets:|     labels:)", line)]
    assert example[0] == "    static_configs:"
    targets = re.findall(r'"127\.0\.0\.1:(\d+)"', "\n".join(example))
    ranks = re.findall(r'rank: "(\d+)"', "\n".join(example))
    # rank r on metrics.port + r, labelled r
    assert [int(p) - 9108 for p in targets] == [int(r) for r in ranks] == [0, 1]
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(
        config.replace(single, "\n".join(example) + "\n"))
    out = run(promtool(), "check", "config", tmp_path / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_job_is_the_one_the_alerts_select():
    config = (PROMETHEUS / "prometheus.yml").read_text()
    assert re.search(r"job_name:\s*streamrnn\b", config)
    assert '"127.0.0.1:9108"' in config
    assert 'up{job="streamrnn"}' in (PROMETHEUS / "alerts.yml").read_text()


# ---- metric names: everything deploy/ names, the daemon exports -------------------------
@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name the daemon's registry exposes, from its exposition text."""
    metrics = Metrics()
    metrics.watch_device(lambda: (0.0, 0.0))
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$",
                                 generate_latest(metrics.registry).decode(), re.M):
        if name.endswith("_created"):
            continue  # the daemon turns these off (disable_created_metrics)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        else:  # counter (already _total), gauge, info (already _info)
            names.add(name)
    assert "streamrnn_tokens_trained_total" in names  # the format is what we think
    assert "streamrnn_update_duration_seconds_bucket" in names
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return out


def dashboard_exprs(board: dict) -> list[str]:
    exprs = [t["expr"] for p in data_panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_metrics_exist(exported: set[str]):
    used = {name for expr in dashboard_exprs(dashboard())
            for name in METRIC_NAME.findall(expr)}
    assert len(used) > 15
    assert used - exported == set()


def test_alert_metrics_exist(exported: set[str]):
    used = set(METRIC_NAME.findall((PROMETHEUS / "alerts.yml").read_text()))
    assert len(used) > 8
    assert used - exported == set()


# ---- Grafana --------------------------------------------------------------------------
def test_dashboard_is_provisionable():
    board = dashboard()
    assert board["uid"] == "streamrnn" and board["title"]
    assert "id" not in board  # Grafana assigns ids; a fixed one clashes across installs
    assert board["schemaVersion"] >= 36
    # panels query the data source variable, whose default is the provisioned uid
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    default = variables["datasource"]["current"]["value"]
    assert re.search(rf"^\s*uid:\s*{default}\s*$", DATASOURCE.read_text(), re.M)
    assert re.search(r"^\s*url:\s*http://127\.0\.0\.1:9090\s*$", DATASOURCE.read_text(),
                     re.M)
    assert re.search(r"^\s*path:\s*/\S+", PROVIDER.read_text(), re.M)
    assert re.search(r"^\s*type:\s*file\s*$", PROVIDER.read_text(), re.M)


def test_dashboard_panels_are_complete():
    board = dashboard()
    panels = data_panels(board)
    assert len(panels) >= 15
    every = board["panels"] + [p for row in board["panels"] for p in row.get("panels", [])]
    assert len({p["id"] for p in every}) == len(every)
    for panel in panels:
        assert panel.get("title"), panel
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t.get("expr") for t in panel["targets"]), \
            panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))


def test_dashboard_layout_has_no_overlaps():
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    # promtool has no query linter, but it parses every expr of a rules file: give it
    # each dashboard query as a recording rule, Grafana's variables filled in
    fill = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h",
            "$job": "streamrnn", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs(dashboard())):
        if expr.startswith("label_values("):
            continue  # Grafana's own query function
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run(promtool(), "check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


# ---- what deploy/ tells operators -------------------------------------------------------
def test_example_config_sets_every_key():
    """Every key is written out: an operator sees what exists (nothing left commented
    out as if it were not there yet), and `streamrnn config` documents the values."""
    import tomllib
    tree = tomllib.loads((DEPLOY / "config.toml").read_text())
    for section, spec in Config.__dataclass_fields__.items():
        keys = list(spec.default_factory.__dataclass_fields__)  # type: ignore[union-attr]
        assert list(tree[section]) == keys, section


def test_unit_documents_a_memory_cap_and_installs_from_the_checkout():
    text = UNIT.read_text()
    assert re.search(r"^# MemoryMax=\S+$", text, re.M)  # commented: site policy
    assert "MemoryMax" not in "".join(unit_settings(text))
    assert re.search(r"pip install \.$", text, re.M) and "./streamrnn" not in text


def test_deploy_readme_lists_the_folder_the_service_keeps_checkpoints_in(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/streamrnn")  # what StateDirectory= sets
    state = streamrnn.load_config(DEPLOY / "config.toml").checkpoint.resolved_dir()
    assert f"streamrnn checkpoint list {state}\n" in (DEPLOY / "README.md").read_text()


def test_deploy_readme_makes_folders_before_use_and_merges_the_prometheus_config():
    text = (DEPLOY / "README.md").read_text()
    # the producers' folder is created before keys are copied into it
    created = re.search(r"^install -d\b.* /etc/streamrnn/producers$", text, re.M)
    copied = re.search(r"^install .*\S /etc/streamrnn/producers/$", text, re.M)
    assert created and copied and created.start() < copied.start()
    # an existing Prometheus config is merged into, never replaced
    assert not re.search(r"^install .*prometheus\.yml", text, re.M)
    assert "rule_files:" in text and "job_name: streamrnn" in text
    # the torch build is a choice, said out loud
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "Python 3.11" in text
