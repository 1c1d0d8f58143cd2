"""Config: defaults, TOML files, overrides, and one clear error naming the key."""
from __future__ import annotations

import pytest

from streamrnn import ConfigError, load_config
from streamrnn.config import config_from_dict, format_config


def test_defaults_are_valid():
    config = load_config()
    assert config.model.kind == "lstm" and config.model.vocab_size == 256
    assert config.train.k1 <= config.train.k2
    assert config.train.optimizer in ("adam", "sgd")


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nkind = "gru"\nhidden_size = 32\n[train]\nk1 = 4\nk2 = 9\n'
                    'lr = 1\n')
    config = load_config(path, ["train.k2=12", "train.device=cpu", "model.num_layers=2"])
    assert (config.model.kind, config.model.hidden_size, config.model.num_layers) == (
        "gru", 32, 2)
    assert (config.train.k1, config.train.k2, config.train.device) == (4, 12, "cpu")
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


@pytest.mark.parametrize("overrides,message", [
    (["train.k1=16", "train.k2=8"], "train.k2 = 8 must be >= train.k1 = 16"),
    (["model.vocab_size=0"], "model.vocab_size = 0 must be >= 1"),
    (["model.hidden_size=-3"], "model.hidden_size = -3 must be >= 1"),
    (["train.k1=abc"], "train.k1 = 'abc': expected int, got str"),
    (["train.k1=2.5"], "train.k1 = 2.5: expected int, got float"),
    (["train.k1=true"], "train.k1 = True: expected int, got bool"),
    (["model.kind=transformer"], "model.kind = 'transformer': expected one of lstm, gru"),
    (["train.precision=fp16"], "train.precision = 'fp16': expected one of"),
    (["train.device=gpu"], "train.device = 'gpu'"),
    (["train.grad_clip=-1"], "train.grad_clip = -1.0 must be >= 0"),
    # one infinite setting would poison the weights for good (every later update skipped,
    # and a restart's replay runs the logged updates with the rate they ran with)
    (["train.lr=inf"], "train.lr = inf: expected a finite number"),
    (["train.lr=1e400"], "train.lr = inf: expected a finite number"),
    (["train.lr=1000"], "train.lr = 1000.0 must be in (0, 10]"),  # finite, but a wreck
    (["train.lr=0"], "train.lr = 0.0 must be in (0, 10]"),
    (["train.grad_clip=inf"], "train.grad_clip = inf: expected a finite number"),
    (["train.flush_after_seconds=nan"], "train.flush_after_seconds = nan: expected a "
     "finite number"),
    (["train.optimiser=sgd"], "unknown key train.optimiser (did you mean 'optimizer'?)"),
    (["trian.k1=3"], "unknown section [trian] (did you mean 'train'?)"),
    (["k1=3"], "override 'k1=3': expected SECTION.KEY=VALUE"),
    (["train.k1"], "override 'train.k1': expected SECTION.KEY=VALUE"),
    ([".k1=3"], "expected SECTION.KEY=VALUE"),
    (["train.=3"], "expected SECTION.KEY=VALUE"),
    (["train.cpu_threads=-1"], "train.cpu_threads = -1 must be >= 0"),
    (["train.adam_beta1=1"], "train.adam_beta1 = 1.0 must be in [0, 1)"),
    (["train.adam_beta2=-0.1"], "train.adam_beta2 = -0.1 must be in [0, 1)"),
    (["train.adam_eps=0"], "train.adam_eps = 0.0 must be > 0"),
    (["train.lr_floor=1.5"], "train.lr_floor = 1.5 must be in 0 .. 1 (a fraction of "
     "train.lr)"),
    (["train.warmup_updates=-1"], "train.warmup_updates and train.lr_decay_updates must"),
    (["cluster.timeout_seconds=0"], "cluster.timeout_seconds = 0.0 must be >= 1"),
    # ZeroMQ would bind 99999 - 65536 = 34463 without a word
    (["ingest.endpoint=tcp://127.0.0.1:99999"],
     "ingest.endpoint = 'tcp://127.0.0.1:99999': port '99999' must be in 1 .. 65535"),
    (["ingest.endpoint=tcp://127.0.0.1:0"], "ingest.endpoint = 'tcp://127.0.0.1:0': port"),
    (["ingest.endpoint=tcp://127.0.0.1:http"], "port 'http' must be in 1 .. 65535"),
    (["ingest.endpoint=tcp://:5557"], "ingest.endpoint = 'tcp://:5557': expected "
     "tcp://HOST:PORT or ipc:///PATH (the host is missing)"),
    (["ingest.endpoint=tcp://127.0.0.1"], "(the port is missing)"),
    (["ingest.endpoint=udp://127.0.0.1:5557"], "unknown transport 'udp'"),
    (["ingest.endpoint=localhost:5557"], "ingest.endpoint = 'localhost:5557': expected"),
    (["metrics.port=70000"], "metrics.port = 70000 must be in 0 .. 65535"),
    (["metrics.address="], "metrics.address is empty"),
    # half of CURVE would start open to anyone: both keys named
    (["ingest.curve_allowed_keys=/etc/streamrnn/producers"],
     "ingest.curve_allowed_keys is set but ingest.curve_secret_key is empty"),
    (["ingest.curve_secret_key=/etc/streamrnn/keys/server.key_secret"],
     "ingest.curve_secret_key is set but ingest.curve_allowed_keys is empty"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:5557", "tcp://*:5557", "tcp://127.0.0.1:*", "tcp://[::1]:5557",
    "tcp://eth0:1", "tcp://localhost:65535", "ipc:///run/streamrnn/ingest.sock",
    "inproc://ingest"])
def test_endpoints_that_bind(endpoint):
    assert load_config(overrides=[f"ingest.endpoint={endpoint}"]).ingest.endpoint == endpoint


def test_cpu_threads():
    assert load_config().train.cpu_threads == 0  # half the cores (test_learner.py)
    assert load_config(overrides=["train.cpu_threads=1"]).train.cpu_threads == 1
    assert "else half the cores, at least 1" in format_config(load_config())


def test_curve_needs_both_keys_or_neither():
    config = load_config(overrides=["ingest.curve_secret_key=/k/server.key_secret",
                                    "ingest.curve_allowed_keys=/k/producers"])
    assert config.ingest.curve_secret_key and config.ingest.curve_allowed_keys
    assert not load_config().ingest.curve_secret_key


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nk1 = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    flat = tmp_path / "flat.toml"
    flat.write_text("k1 = 3\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\]"):
        load_config(flat)
    typo = tmp_path / "typo.toml"
    typo.write_text("[model]\nhiden_size = 3\n")
    with pytest.raises(ConfigError, match=f"{typo}: unknown key model.hiden_size"):
        load_config(typo)


def test_printed_config_loads_back(tmp_path):
    config = load_config(overrides=["model.kind=gru", "train.lr=0.25", "train.device=cpu"])
    text = format_config(config)
    assert "# recurrent cell" in text and 'kind = "gru"' in text
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert load_config(path) == config
    assert config_from_dict(config.to_dict()) == config


def test_readme_shows_the_current_defaults():
    """README's configuration block is `streamrnn config`'s output: keep them in step."""
    from pathlib import Path
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert format_config(load_config()).strip() in readme


def test_a_saved_config_is_read_leniently():
    """What a checkpoint or the log saved is only compared: keys another version added
    or dropped, and values a newer rule would refuse, must not make it unreadable."""
    saved = load_config().to_dict()
    saved["model"]["a_key_from_elsewhere"] = 1
    saved["ingest"]["curve_allowed_keys"] = "/etc/streamrnn/producers"  # no secret key
    del saved["train"]["cpu_threads"]
    config = config_from_dict(saved)
    assert config.model == load_config().model


def test_a_saved_config_without_a_newer_key_reads_as_what_it_ran_with():
    """A key added since a checkpoint was written takes the value the code had in effect
    then, not today's default: Adam's betas and eps were torch's, the lr constant."""
    saved = load_config(overrides=["train.adam_beta1=0.5"]).to_dict()
    for key in ("adam_beta1", "adam_beta2", "adam_eps", "warmup_updates",
                "lr_decay_updates", "lr_floor"):
        del saved["train"][key]
    train = config_from_dict(saved).train
    assert (train.adam_beta1, train.adam_beta2, train.adam_eps) == (0.9, 0.999, 1e-8)
    assert (train.warmup_updates, train.lr_decay_updates, train.lr_floor) == (0, 0, 0)
