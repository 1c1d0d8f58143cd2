"""The wire protocol as README.md ("Wire protocol") writes it down: what a producer
written from the README alone meets (issue 12). The reply table is parsed from the
README and checked against a real daemon's replies, so the two cannot drift."""
from __future__ import annotations

import re
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from harness import DaemonProcess, RawClient
from inprocess import arrive, ask, ask_until_answered
from streamrnn import load_config, wire
from streamrnn.core.learner import LearnResult
from streamrnn.serve import handlers

README = Path(__file__).resolve().parent.parent / "README.md"
LIMITS = wire.Limits(vocab_size=256, max_message_bytes=4096, max_tokens_per_message=100,
                     max_stream_id_bytes=16)


def pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(message) -> wire.Request | wire.Refusal:
    return wire.decode(message if isinstance(message, bytes) else pack(message), LIMITS)


def tokens_msg(stream="s", offset=0, **fields) -> dict:
    return {"type": "tokens", "stream": stream, "offset": offset, **fields}


# ---- the README's text ------------------------------------------------------------------
def wire_section() -> str:
    text = README.read_text()
    return text[text.index("## Wire protocol\n"):text.index("## The Python producer client")]


def table_after(marker: str) -> list[list[str]]:
    """The rows of the first table after `marker` in the wire protocol section."""
    section = wire_section()
    lines = section[section.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [row for row in rows[2:]]  # header and |---| line


def unquote(cell: str) -> str:
    return cell.replace("`", "").strip()


def reply_table() -> dict[str, dict[str, tuple[str, str]]]:
    """{reply group: {field: (type, description)}}; "every reply" for fields of all."""
    table: dict[str, dict[str, tuple[str, str]]] = {}
    for reply, name, kind, what in table_after("**Replies.**"):
        table.setdefault(unquote(reply), {})[unquote(name)] = (kind, what)
    return table


def matches(value, spec: str) -> bool:
    spec = spec.strip()
    if " or " in spec:
        return any(matches(value, part) for part in spec.split(" or "))
    if spec.startswith("array of "):
        return isinstance(value, list) and all(matches(v, spec[9:]) for v in value)
    if spec.startswith("["):
        parts = [p.strip() for p in spec.strip("[]").split(",")]
        return isinstance(value, list) and len(value) == len(parts) and \
            all(matches(v, p) for v, p in zip(value, parts))
    python = {"int": int, "float": float, "str": str, "bool": bool, "map": dict,
              "nil": type(None)}[spec]
    return type(value) is python


def group_of(reply: dict) -> str:
    if reply["type"] == "checkpoint" and reply.get("ok") is False:
        return "checkpoint (failed)"
    return reply["type"]


def check_reply(reply: dict, sent_id, table) -> str:
    """The reply has exactly the README's fields for its type, each of its type."""
    group = group_of(reply)
    assert group in table, f"reply type {group!r} is not in the README's table: {reply}"
    fields = {**table[group], "id": table["every reply"]["id"]}
    top = {name: spec for name, spec in fields.items() if "." not in name}
    extra = set(reply) - {"type"} - set(top)
    assert not extra, f"{group}: fields {extra} not in the README: {reply}"
    for name, (kind, what) in top.items():
        if what.startswith("only"):
            if name == "id":
                expected = sent_id is not None
            else:  # "only for `gap`, `backlogged`, ...": the reasons that carry it
                reasons = re.findall(r"`(\w+)`", what.split(":")[0])
                expected = reply.get("reason") in reasons
            assert (name in reply) == expected, f"{group}.{name} ({what}): {reply}"
            if name not in reply:
                continue
        assert name in reply, f"{group}: {name} missing from {reply}"
        assert matches(reply[name], kind), f"{group}.{name} = {reply[name]!r}, not {kind}"
        inner = {n.split(".", 1)[1]: spec for n, spec in fields.items()
                 if n.startswith(name + ".")}
        if inner and isinstance(reply[name], dict):
            assert set(reply[name]) == set(inner), f"{group}.{name}: {reply[name]}"
            for key, (kind_, _) in inner.items():
                assert matches(reply[name][key], kind_), f"{group}.{name}.{key}: {reply}"
    if sent_id is not None:
        assert reply["id"] == sent_id
    return group


def test_the_readme_tables_parse_and_name_every_reason():
    table = reply_table()
    assert {"every reply", "ack", "busy", "nack", "position", "status", "prediction",
            "generated", "flush", "ended", "checkpoint", "checkpoint (failed)",
            "working"} == set(table)
    assert table["status"]["vocab_size"][0] == "int"
    assert table["status"]["last_checkpoint"][0] == "map or nil"
    reasons = [unquote(row[0]) for row in table_after("**Refusals.**")]
    assert sorted(reasons) == sorted(wire.REASONS)
    requests = [unquote(row[0]) for row in table_after("| request `type`")]
    assert sorted(requests) == sorted(wire.REQUEST_TYPES)


def test_the_limits_table_says_the_code_s_limits():
    limits = {unquote(row[0]): unquote(row[1]) for row in table_after("**Limits.**")}
    assert limits["keys in a request map (and in any map inside it)"] == str(wire.MAX_KEYS)
    assert limits["offset"] == "0 .. 2^62" and wire.MAX_OFFSET == 2**62
    assert f"at most {wire.MAX_ID_BYTES} UTF-8 bytes" in limits["id"]
    assert limits["num_tokens"].startswith(f"1 .. {wire.MAX_GENERATE} ")
    assert f"{handlers.MAX_PREDICT_BACKLOG:,}" in \
        limits["untrained tokens of the stream, for predict and generate"]
    assert "5000" in wire_section() and handlers.MAX_RETRY_MS == 5000
    assert "last 60 s of training" in wire_section() and handlers.RECENT_SECONDS == 60


# ---- point 1: width ---------------------------------------------------------------------
def test_bin_tokens_may_be_one_byte_each():
    request = decode(tokens_msg(tokens=bytes([0, 7, 255]), width=1))
    assert isinstance(request, wire.Request) and request.tokens.tolist() == [0, 7, 255]
    four = decode(tokens_msg(tokens=np.array([3, 255], "<u4").tobytes(), width=4))
    assert four.tokens.tolist() == [3, 255]


@pytest.mark.parametrize("fields,words", [
    ({"tokens": b"\0\0"}, "it is missing"),
    ({"tokens": b"\0\0\0", "width": 3}, "it is 3"),
    ({"tokens": b"\0\0", "width": True}, "it is a bool"),
    ({"tokens": b"\0\0", "width": 2.0}, "it is a float"),
])
def test_a_bad_width_says_which_widths_there_are(fields, words):
    refusal = decode(tokens_msg(**fields))
    assert refusal.reason == "bad_field"
    assert refusal.message.startswith("width must be 1 (uint8), 2 (uint16) or 4 (uint32)")
    assert refusal.message.endswith(words)


def test_encode_tokens_takes_the_narrowest_width():
    def width(tokens, **kw):
        return msgpack.unpackb(wire.encode_tokens("s", 0, tokens, **kw))["width"]
    assert width([0, 255]) == 1 and width(np.arange(256)) == 1 and width([]) == 1
    assert width([1, 256]) == 2 and width([65535]) == 2 and width([65536]) == 4
    assert width([1, 2], width=4) == 4
    with pytest.raises(ValueError, match="token 256 does not fit width 1"):
        wire.encode_tokens("s", 0, [1, 256], width=1)
    with pytest.raises(ValueError, match="width must be 1, 2 or 4"):
        wire.encode_tokens("s", 0, [1], width=3)
    data = msgpack.unpackb(wire.encode_tokens("s", 0, [1, 2, 250]))
    assert data["tokens"] == bytes([1, 2, 250])  # a byte a token


# ---- point 3: reasons and messages ----------------------------------------------------
def test_a_missing_stream_is_a_missing_field():
    for kind in ("tokens", "position", "predict", "generate", "end"):
        refusal = decode({"type": kind, "offset": 0, "tokens": [], "id": 4})
        assert (refusal.reason, refusal.request_id) == ("bad_field", 4), kind
        assert refusal.message.startswith("stream is missing")
    for value in (None, 5, "", "x" * 17, "a\nb"):  # there, but not a usable id
        assert decode(tokens_msg(stream=value, tokens=[])).reason == "bad_stream_id", value
    assert decode({"type": "flush"}).stream is None  # a flush of every stream


def test_a_map_of_more_than_16_keys_is_a_bad_field_with_its_id():
    message = {"type": "status", **{f"k{i}": i for i in range(15)}, "id": "many"}
    assert len(message) == 17
    refusal = decode(message)
    assert refusal == wire.Refusal("bad_field", "a request has at most 16 keys; this one "
                                   "has 17", "many")
    assert isinstance(decode({k: v for k, v in message.items() if k != "k14"}),
                      wire.Request)  # 16 are fine
    # a map header claiming more pairs than the bytes can hold is not a request at all
    forged = decode(b"\xde\x04\x00" + b"\xa1a\x00" * 3)
    assert forged.reason == "malformed" and "a length header larger" in forged.message
    nested = decode({"type": "status", "id": 2, "x": {str(i): i for i in range(17)}})
    assert (nested.reason, nested.request_id) == ("bad_field", 2)
    assert nested.message == "a map inside a request has at most 16 keys"
    assert wire.decode(pack({**message, "pad": "x" * 5000}), LIMITS).request_id == "many"


MALFORMED = [
    (b"\xc1", "a byte that starts no msgpack value"),
    (b"", "an empty frame"),
    (pack({"type": "status"}) + b"\0", "bytes left over after the first value"),
    (pack({"type": "status", "id": 1})[:-1], "it ends in the middle of a value"),
    (pack({1: "status"}), "map keys must be strings"),
    (b"\xc6\xff\xff\xff\xff" + b"abc", "it ends in the middle of a value"),
    (b"\xdd\xff\xff\xff\xff" + b"\0" * 8, "a length header larger than the message"),
    (b"\x91" * 2000 + b"\xc0", "nested too deeply"),
]


@pytest.mark.parametrize("payload,words", MALFORMED)
def test_malformed_messages_say_why_in_words(payload, words):
    refusal = decode(payload)
    assert refusal.reason == "malformed"
    assert refusal.message.startswith(f"not a msgpack message ({words}")
    assert refusal.message.endswith(")")


WORDED = [
    ({"type": "hello"}, "unknown_type", "type 'hello' is not one of: tokens, position, "
     "status, predict, generate, flush, checkpoint, end, topology"),
    ({"stream": "x"}, "unknown_type", "type is missing: every request has one, one of: "
     "tokens, position, status, predict, generate, flush, checkpoint, end, topology"),
    ({"type": None}, "unknown_type", "type must be a string, one of: tokens, position, "
     "status, predict, generate, flush, checkpoint, end, topology; this one is nil"),
    ([1, 2], "malformed", "a request must be a msgpack map; this is an array"),
    (tokens_msg(offset="0", tokens=[]), "bad_field",
     "offset must be an integer in 0 .. 4611686018427387904; this one is a str"),
    (tokens_msg(offset=-1, tokens=[]), "bad_field",
     "offset = -1 is outside 0 .. 4611686018427387904"),
    (tokens_msg(stream=7, tokens=[]), "bad_stream_id",
     "stream must be a string (msgpack str, UTF-8); this one is an int"),
    (tokens_msg(tokens=[1, None]), "bad_field",
     "tokens as an array must hold integers only; it holds nil"),
    ({"type": "predict", "stream": "x", "top_k": 0}, "bad_field",
     "top_k = 0 is outside 1 .. 256 (model.vocab_size)"),
    ({"type": "predict", "stream": "x", "top_k": None}, "bad_field",
     "top_k must be an integer in 1 .. 256 (model.vocab_size); this one is nil"),
    ({"type": "status", "id": 1.5}, "bad_field", "id must be an integer (64 bits) or a "
     "UTF-8 string of at most 256 bytes; this one is a float"),
]


@pytest.mark.parametrize("message,reason,text", WORDED)
def test_refusals_are_worded_for_a_user(message, reason, text):
    refusal = decode(message)
    assert (refusal.reason, refusal.message) == (reason, text)


def test_no_refusal_speaks_python():
    payloads = [p for p, _ in MALFORMED] + [pack(m) for m, _, _ in WORDED] + [
        pack({"type": b"status"}), pack({"type": 7}), pack(tokens_msg()),
        pack(tokens_msg(tokens={"a": 1})), pack({"type": "generate", "stream": "x",
                                                 "temperature": "hot"})]
    for payload in payloads:
        message = decode(payload).message
        assert message and not message.endswith(": "), payload
        for internal in ("Error", "None", "exceeds max_", "<class", "b'", "strict_map_key",
                         "unpack", "Unpack"):
            assert internal not in message, (payload, message)


# ---- point 8: limits --------------------------------------------------------------------
def test_offsets_go_to_2_to_the_62():
    assert decode(tokens_msg(offset=2**62, tokens=[])).offset == 2**62
    assert decode(tokens_msg(offset=2**62 + 1, tokens=[])).reason == "bad_field"
    assert decode(tokens_msg(tokens=list(range(100)))).tokens.shape == (100,)
    assert decode(tokens_msg(tokens=list(range(101)))).reason == "too_many_tokens"


# ---- a daemon in this process, on a clock the test moves (the make_daemon fixture) ------
NOTHING_TRAINS = ["train.k1=1000", "train.k2=1000"]  # no stream here reaches k1 tokens


def test_the_queue_holds_at_most_max_queued_seconds_of_training(make_daemon):
    d, clock, c = make_daemon(*NOTHING_TRAINS, "ingest.max_queued_tokens=10000",
                              "ingest.max_tokens_per_message=100",
                              "ingest.max_queued_seconds=2", "ingest.busy_retry_ms=20")
    h = d.handlers
    # no rate known yet: the token bound only
    assert h.queue_limit() == 10000
    for offset in range(0, 300, 100):
        assert ask(d, c, tokens_msg("a", offset, tokens=[1] * 100))["type"] == "ack"
    assert d.learner.num_untrained == 299
    # 100 targets in 1 s spent training (over any wall time): 2 s of it is 200 tokens
    h.rate.add(clock.now, LearnResult(targets=100), 1.0)
    assert h.queue_limit() == 200
    status = ask(d, c, {"type": "status"})
    assert status["queue_limit_tokens"] == 200
    assert status["training_tokens_per_second"] == 100.0
    busy = ask(d, c, tokens_msg("a", 300, tokens=[1]))
    assert busy["type"] == "busy"
    # down to 3/4 of 200 (150) and room for the 1: 149 targets at 100/s
    assert busy["retry_after_ms"] == int(1000 * 149 / 100)
    # resent duplicates are acked whatever the queue holds: they are not new
    assert ask(d, c, tokens_msg("a", 200, tokens=[1] * 100))["type"] == "ack"
    import prometheus_client
    text = prometheus_client.generate_latest(d.metrics.registry).decode()
    assert "streamrnn_ingest_queue_limit_tokens 200.0" in text


def test_the_time_bound_never_refuses_one_message_into_an_empty_queue(make_daemon):
    d, clock, c = make_daemon(*NOTHING_TRAINS, "ingest.max_queued_tokens=10000",
                              "ingest.max_tokens_per_message=100",
                              "ingest.max_queued_seconds=2")
    d.handlers.rate.add(clock.now, LearnResult(targets=1), 100.0)  # 0.01 tokens/s
    assert d.handlers.queue_limit() == 100
    assert ask(d, c, tokens_msg("a", 0, tokens=[1] * 100))["type"] == "ack"


def test_max_queued_seconds_0_is_no_time_bound(make_daemon):
    d, clock, c = make_daemon(*NOTHING_TRAINS, "ingest.max_queued_tokens=10000",
                              "ingest.max_tokens_per_message=100",
                              "ingest.max_queued_seconds=0")
    d.handlers.rate.add(clock.now, LearnResult(targets=1), 100.0)
    assert d.handlers.queue_limit() == 10000


def test_the_default_time_bound_is_10_seconds():
    assert load_config().ingest.max_queued_seconds == 10.0
    from streamrnn.config import ConfigError
    with pytest.raises(ConfigError, match="ingest.max_queued_seconds = -1.0 must be >= 0"):
        load_config(overrides=["ingest.max_queued_seconds=-1"])


def test_recent_rates_forget_a_quiet_minute(make_daemon):
    d, clock, c = make_daemon(*NOTHING_TRAINS)
    d.handlers.rate.add(clock.now, LearnResult(targets=600, bits=1200.0), 2.0)
    status = d.handlers.status()
    assert status["recent_bits_per_token"] == 2.0
    assert status["training_tokens_per_second"] == 300.0
    clock.now += 61  # nothing trained since
    status = d.handlers.status()
    assert status["recent_bits_per_token"] is None
    assert status["recent_tokens_per_second"] == 0.0
    # the busy hint and the time bound keep the rate last seen while training
    assert status["training_tokens_per_second"] == 300.0


def test_a_failed_checkpoint_and_an_internal_error_match_the_readme(make_daemon, monkeypatch):
    d, clock, c = make_daemon(env={"STREAMRNN_FAIL_AT": "checkpoint_write:1"})
    table = reply_table()
    ask(d, c, tokens_msg("s", 0, tokens=list(range(10))))  # 9 targets: 1 waits
    failed = ask_until_answered(d, c, {"type": "checkpoint", "id": 8})
    assert check_reply(failed, 8, table) == "checkpoint (failed)"

    # ended: answered before the update that trains its last target forgets it
    for message in ({"type": "end", "stream": "s"}, tokens_msg("s", 10, tokens=[1]),
                    tokens_msg("s", 0, tokens=[0])):
        c.send(message)
    arrive(d, 3)
    d.intake()
    ended, refused, resent = (c.receive(timeout=5) for _ in range(3))
    assert check_reply(ended, None, table) == "ended"
    assert (refused["reason"], refused["stream"]) == ("ended", "s")
    check_reply(refused, None, table)
    assert (resent["type"], resent["duplicates"]) == ("ack", 1)  # duplicates: still acked

    def broken(request):
        raise RuntimeError("a bug")
    monkeypatch.setattr(d.handlers, "_on_position", broken)
    internal = ask(d, c, {"type": "position", "stream": "s", "id": 9})
    assert internal["reason"] == "internal"
    check_reply(internal, 9, table)


# ---- every reply of a real daemon against the README's table ---------------------------
def test_every_reply_matches_the_readme_table(tmp_path):
    table = reply_table()
    seen: set[str] = set()
    nack_reasons: set[str] = set()
    d = DaemonProcess(tmp_path, ["train.k1=20000", "train.k2=20000",
                                 "ingest.max_tokens_per_message=20000",
                                 "ingest.max_queued_tokens=40000", "ingest.max_streams=4",
                                 "ingest.max_stream_id_bytes=16",
                                 "ingest.max_queued_seconds=0"]).start()  # tested above
    next_id = iter(range(1, 1000))

    def ask_(request, with_id=True, **expect):
        sent = next(next_id) if with_id and not isinstance(request, bytes) else None
        raw = request if isinstance(request, bytes) else pack(
            {**request, "id": sent} if sent is not None else request)
        reply = client.ask(raw)
        seen.add(check_reply(reply, sent, table))
        if reply["type"] == "nack":
            nack_reasons.add(reply["reason"])
        for key, value in expect.items():
            assert reply[key] == value, (key, reply)
        return reply

    try:
        with RawClient(d.endpoint) as client:
            first = ask_({"type": "status"}, vocab_size=256, last_checkpoint=None,
                         queued_tokens=0, training_tokens_per_second=None)
            assert first["tbptt"] == [20000, 20000]
            ask_(tokens_msg("a", 0, tokens=[1, 2, 3]), type="ack", next_offset=3,
                 accepted=3, duplicates=0)
            ask_(tokens_msg("a", 3, tokens=bytes([4, 5, 255]), width=1), type="ack",
                 next_offset=6, accepted=3)
            ask_(tokens_msg("a", 2, tokens=np.array([3, 4, 5, 6, 7], "<u2").tobytes(),
                            width=2), with_id=False, type="ack", next_offset=7, accepted=1,
                 duplicates=4)
            # an empty message is acked and creates no stream
            ask_(tokens_msg("empty", 0, tokens=[]), type="ack", next_offset=0, accepted=0)
            ask_({"type": "position", "stream": "empty"}, next_offset=0)
            ask_(tokens_msg("a", 9, tokens=[1]), type="nack", reason="gap", stream="a",
                 next_offset=7)
            ask_({"type": "position", "stream": "a"}, next_offset=7)
            # ties come in token order: an unknown stream's prediction is uniform
            uniform = ask_({"type": "predict", "stream": "nobody", "top_k": 5},
                           next_offset=0)
            assert [t for t, _ in uniform["top"]] == [0, 1, 2, 3, 4]
            again = ask_({"type": "predict", "stream": "a", "top_k": 256})
            assert again == ask_({"type": "predict", "stream": "a", "top_k": 256}) | {
                "id": again["id"]}
            order = [(-p, t) for t, p in again["top"]]
            assert order == sorted(order) and len(order) == 256
            ask_({"type": "generate", "stream": "a", "num_tokens": 5, "seed": 3})
            # a long request asked again with its id while it runs: `working`, run once
            # (the position after it would get a second `generated` otherwise)
            long = pack({"type": "generate", "stream": "a", "num_tokens": 4096, "id": "g"})
            client.send(long)
            client.send(long)
            replies = [client.receive(timeout=60), client.receive(timeout=60)]
            assert [r["type"] for r in replies] == ["working", "generated"], replies
            seen.update(check_reply(r, "g", table) for r in replies)
            assert replies[0]["request"] == "generate" and 0 <= replies[0]["progress"] < 1
            ask_({"type": "position", "stream": "a"}, next_offset=7)
            ask_({"type": "flush"}, type="flush", stream=None, scheduled=1)
            ask_({"type": "flush", "stream": "nobody"}, type="flush", scheduled=0)
            ask_({"type": "flush", "stream": "a"})
            deadline = time.monotonic() + 30
            while ask_({"type": "status"})["queued_tokens"]:  # a's 6 targets trained
                assert time.monotonic() < deadline, "the flush never came"
                time.sleep(0.1)
            # a backlog the model would have to run over first
            ask_(tokens_msg("big", 0, tokens=[7] * 17000), type="ack")
            ask_({"type": "predict", "stream": "big"}, type="nack", reason="backlogged",
                 stream="big")
            ask_({"type": "generate", "stream": "big"}, type="nack", reason="backlogged")
            # 16,999 queued: 19,999 more fit the 40,000, then a message one too long not
            ask_(tokens_msg("big2", 0, tokens=[7] * 20000), type="ack")
            queued = ask_({"type": "status"})["queued_tokens"]
            assert queued == 16999 + 19999
            ask_(tokens_msg("c", 0, tokens=[7] * (40000 - queued + 1)), type="busy",
                 stream="c")
            ask_(tokens_msg("c", 0, tokens=[7] * (40000 - queued)), type="ack")  # fits
            ask_(tokens_msg("d", 0, tokens=[7]), type="nack", reason="too_many_streams",
                 stream="d")
            ask_({"type": "end", "stream": "nobody"}, type="ended", known=False,
                 next_offset=0)
            ask_({"type": "end", "stream": "c"}, type="ended", known=True)
            # refusals before any field is read, with and without a readable id
            ask_(b"\xc1", type="nack", reason="malformed")
            ask_({"type": "status", **{f"k{i}": i for i in range(15)}}, type="nack",
                 reason="bad_field", message="a request has at most 16 keys; this one "
                 "has 17")
            ask_({"type": "tokens", "offset": 0, "tokens": []}, type="nack",
                 reason="bad_field")
            ask_({"type": "hello"}, type="nack", reason="unknown_type")
            ask_(tokens_msg("x" * 17, tokens=[]), type="nack", reason="bad_stream_id")
            ask_(tokens_msg("x", tokens=[256]), type="nack", reason="token_out_of_range")
            ask_(tokens_msg("x", tokens=[0] * 20001), type="nack",
                 reason="too_many_tokens")
            ask_(pack({"type": "status", "pad": b"\0" * (1 << 20)}), type="nack",
                 reason="too_large")
            saved = ask_({"type": "checkpoint"}, type="checkpoint", ok=True)
            assert saved["path"].startswith("/") and saved["path"].endswith(".json")
            assert ask_({"type": "checkpoint"})["path"] == saved["path"]  # no news
            status = ask_({"type": "status"})
            assert status["last_checkpoint"]["path"] == saved["path"]
    finally:
        assert d.stop() == 0
    everything = set(table) - {"every reply", "checkpoint (failed)"}  # that one: above
    assert seen == everything, everything - seen
    # internal, ended: above; moved: only a cluster sends it (test_cluster.py)
    assert nack_reasons == set(wire.REASONS) - {"internal", "ended", "moved"}


def test_a_forged_length_inside_a_request_is_malformed_not_a_big_map():
    """A map header inside a request that claims more pairs than the message holds: no
    request at all (found by the hostile-input property test)."""
    inner = b"\xdf\x00\x02\x00\x00"  # a map of 131,072 pairs, and no pairs
    payload = b"\x85\xa4type\xa6tokens\xa6stream\xa1x\xa6offset\x00\xa5width\x02\xa6tokens" \
        + inner
    refusal = decode(payload)
    assert refusal.reason == "malformed" and "a length header larger" in refusal.message
