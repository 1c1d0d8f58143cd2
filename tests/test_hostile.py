"""Hostile input against one real daemon, while a well-behaved producer feeds it.

Every message below is built knowing the refusal README.md ("Wire protocol") prescribes
for it, and carries exactly one defect, so the expected reason does not depend on the
order in which the daemon checks fields. The checks: the daemon stays up, each hostile
message gets exactly one reply and it is the right nack (with the request's id when it
had a readable one, next_offset for gaps), streamrnn_messages_rejected_total counts them
by reason, resident memory stays bounded, and the good producer's stream is received and
trained in full, untouched by all of it.
"""
from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness import DaemonProcess, RawClient
from streamrnn.client import Producer
from streamrnn.wire import REQUEST_TYPES

VOCAB = 256                    # model.vocab_size default
MAX_BYTES = 65536
MAX_TOKENS = 1000
MAX_STREAM_BYTES = 64
OVERRIDES = [f"ingest.max_message_bytes={MAX_BYTES}",
             f"ingest.max_tokens_per_message={MAX_TOKENS}",
             f"ingest.max_stream_id_bytes={MAX_STREAM_BYTES}", "ingest.max_streams=1000"]
GAP_STREAM, GAP_END = "hostile-gap", 10   # a stream the fixture fills with 10 tokens
REPLY_TIMEOUT = 10.0


# ---- building messages byte by byte ----------------------------------------------------
class Raw(bytes):
    """Already-encoded msgpack, spliced into a message as it is (lets a map hold invalid
    UTF-8 or a forged length header)."""


def encode(value: Any) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, dict) and any(isinstance(v, Raw) for v in value.values()):
        assert len(value) <= 15
        return bytes([0x80 | len(value)]) + b"".join(
            msgpack.packb(k, use_bin_type=True) + encode(v) for k, v in value.items())
    return msgpack.packb(value, use_bin_type=True)


def raw_str(data: bytes) -> Raw:
    """A msgpack str holding these bytes, UTF-8 or not."""
    n = len(data)
    header = (bytes([0xA0 | n]) if n < 32 else bytes([0xD9, n]) if n < 256
              else b"\xda" + n.to_bytes(2, "big"))
    return Raw(header + data)


def u16(values) -> bytes:
    return np.asarray(values, np.uint64).astype("<u2").tobytes()


def u32(values) -> bytes:
    return np.asarray(values, np.uint64).astype("<u4").tobytes()


MISSING = object()  # a field left out


def message(rid: Any = None, **fields: Any) -> dict:
    out = {k: v for k, v in fields.items() if v is not MISSING}
    if rid is not None:
        out["id"] = rid
    return out


@dataclass
class Hostile:
    label: str
    frames: list[bytes]
    reason: str
    rid: Any = None                   # the id the nack must echo (None: no id in it)
    extra: dict = field(default_factory=dict)  # gap: stream and next_offset

    @property
    def expected(self) -> dict:
        reply = {"type": "nack", "reason": self.reason, **self.extra}
        if self.rid is not None:
            reply["id"] = self.rid
        return reply


def hostile(label: str, payload: bytes | dict, reason: str, rid: Any = None,
            **extra: Any) -> Hostile:
    if isinstance(payload, dict):
        payload = encode(payload)
    return Hostile(label, [payload], reason, rid, extra)


# ---- the daemon, a client, helpers -----------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("hostile"), OVERRIDES).start()
    with RawClient(d.endpoint) as c:
        reply = c.ask(message(type="tokens", stream=GAP_STREAM, offset=0,
                              tokens=list(range(GAP_END))))
        assert reply["type"] == "ack" and reply["next_offset"] == GAP_END, reply
    yield d
    code = d.stop()
    assert code == 0, f"daemon exited with {code}:\n{d.log()[-6000:]}"


def exchange(client: RawClient, frames: list[bytes], timeout: float = REPLY_TIMEOUT) -> dict:
    """Send one request (one or more frames from a DEALER) and read its one reply."""
    client.socket.send_multipart(frames)
    if not client.socket.poll(int(timeout * 1000)):
        raise TimeoutError("no reply")
    reply_frames = client.socket.recv_multipart()
    assert len(reply_frames) == 1, f"a reply of {len(reply_frames)} frames: {reply_frames!r}"
    reply = msgpack.unpackb(reply_frames[0], raw=False)
    assert isinstance(reply, dict), reply
    return reply


def check_refused(daemon: DaemonProcess, client: RawClient, case: Hostile,
                  sequence: int) -> None:
    """Send a hostile message; its one reply must be the expected nack. A position request
    after it proves no second reply came (it would arrive in its place)."""
    where = f"{case.label}: {b''.join(case.frames)[:200]!r}"
    assert daemon.proc.poll() is None, f"daemon is down before {where}\n{daemon.log()[-4000:]}"
    try:
        reply = exchange(client, case.frames)
    except TimeoutError:
        raise AssertionError(f"no reply to {where}; daemon "
                             f"{'alive' if daemon.proc.poll() is None else 'DEAD'}\n"
                             f"{daemon.log()[-4000:]}") from None
    text = reply.pop("message", None)
    assert reply == case.expected, f"{where}\n  got {reply}\n  expected {case.expected}"
    assert isinstance(text, str) and text, f"{where}: nack without a message: {text!r}"
    sentinel = f"sentinel-{sequence}"
    after = exchange(client, [encode({"type": "position", "stream": "sentinel",
                                      "id": sentinel})])
    assert after == {"type": "position", "stream": "sentinel", "next_offset": 0,
                     "id": sentinel}, f"after {where}: a second reply? {after}"
    assert not client.socket.poll(0), f"after {where}: more replies than requests"
    assert daemon.proc.poll() is None, f"daemon died after {where}\n{daemon.log()[-4000:]}"


def scrape(daemon: DaemonProcess) -> str:
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
        return response.read().decode()


def rejected(text: str) -> dict[str, float]:
    """streamrnn_messages_rejected_total by reason."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'streamrnn_messages_rejected_total\{reason="(\w+)"\} (\S+)$', line)
        if m:
            out[m[1]] = float(m[2])
    return out


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_drained(client: RawClient, timeout: float = 60) -> dict:
    """Flush every stream and wait until nothing received is left untrained."""
    deadline = time.monotonic() + timeout
    while True:
        assert exchange(client, [encode({"type": "flush"})])["type"] == "flush"
        until = time.monotonic() + 2
        while time.monotonic() < until:
            status = exchange(client, [encode({"type": "status"})])
            if status["queued_tokens"] == 0:
                return status
            time.sleep(0.05)
        assert time.monotonic() < deadline, f"queue never drained: {status}"


# ---- the hostile classes, by hand: what each looks like and what it gets --------------
def tokens_msg(rid=None, stream="h", offset=0, tokens=b"", width=2, **more) -> dict:
    return message(rid, type="tokens", stream=stream, offset=offset, tokens=tokens,
                   width=width, **more)


HAND = [
    # malformed: not msgpack, not a map, wrong frames, forged lengths, hostile nesting
    hostile("never-used byte 0xc1", b"\xc1", "malformed"),
    hostile("empty frame", b"", "malformed"),
    hostile("an int, not a map", encode(42), "malformed"),
    hostile("an array, not a map", encode([1, 2, 3]), "malformed"),
    hostile("a str, not a map", encode("status"), "malformed"),
    hostile("a map and trailing bytes", encode({"type": "status"}) + b"\x00", "malformed"),
    hostile("truncated map", encode({"type": "status", "id": 1})[:-1], "malformed"),
    hostile("an int map key", encode({1: "status"}), "malformed"),
    hostile("array32 declaring 2**32-1 items", b"\xdd\xff\xff\xff\xff" + b"\x00" * 8,
            "malformed"),
    hostile("map32 declaring 2**32-1 pairs", b"\xdf\xff\xff\xff\xff" + b"\xa1a\x00" * 3,
            "malformed"),
    hostile("bin32 declaring 4 GiB", b"\xc6\xff\xff\xff\xff" + b"abc", "malformed"),
    hostile("str32 declaring 4 GiB", b"\xdb\xff\xff\xff\xff" + b"abc", "malformed"),
    hostile("ext32 declaring 4 GiB", b"\xc9\xff\xff\xff\xff\x01abc", "malformed"),
    hostile("bin32 of 4 GiB as a request's tokens (id unreadable)",
            tokens_msg(5, tokens=Raw(b"\xc6\xff\xff\xff\xff" + b"\x00" * 4)), "malformed"),
    hostile("5000 nested arrays", b"\x91" * 5000 + b"\xc0", "malformed"),
    hostile("5000 nested maps", b"\x81\xa1a" * 5000 + b"\xc0", "malformed"),
    Hostile("two frames from a DEALER", [b"a", encode({"type": "status", "id": 1})],
            "malformed"),
    Hostile("three frames from a DEALER", [b"", b"x", encode({"type": "status"})],
            "malformed"),
    # too_large: between max_message_bytes and twice that (beyond, ZeroMQ drops the peer)
    hostile("70000 bytes of garbage", b"\xc1" * 70000, "too_large"),
    hostile("a 100 kB tokens message with an id",
            tokens_msg("big", tokens=bytes(100_000)), "too_large", "big"),
    # unknown_type
    hostile("type hello", message(1, type="hello"), "unknown_type", 1),
    hostile("type missing", message(stream="x"), "unknown_type"),
    hostile("type an int", message("t", type=7), "unknown_type", "t"),
    hostile("type as bin, not str", message(type=b"status"), "unknown_type"),
    hostile("type with different case", message(type="Status"), "unknown_type"),
    hostile("type invalid UTF-8", message(type=raw_str(b"st\xffatus")), "unknown_type"),
    # bad_field
    hostile("offset a str", tokens_msg(2, offset="0"), "bad_field", 2),
    hostile("offset negative", tokens_msg(offset=-1), "bad_field"),
    hostile("offset a float", tokens_msg(offset=1.0), "bad_field"),
    hostile("offset NaN", tokens_msg(offset=float("nan")), "bad_field"),
    hostile("offset a bool", tokens_msg(offset=True), "bad_field"),
    hostile("offset over 2**62", tokens_msg(offset=2**62 + 1), "bad_field"),
    hostile("offset 2**64-1", tokens_msg(offset=2**64 - 1), "bad_field"),
    hostile("offset missing", tokens_msg(offset=MISSING), "bad_field"),
    hostile("tokens a str", tokens_msg(tokens="abc", width=MISSING), "bad_field"),
    hostile("tokens a map", tokens_msg(tokens={"a": 1}, width=MISSING), "bad_field"),
    hostile("tokens an int", tokens_msg(tokens=7, width=MISSING), "bad_field"),
    hostile("tokens missing", tokens_msg(tokens=MISSING), "bad_field"),
    hostile("width 3", tokens_msg(tokens=b"\x00" * 6, width=3), "bad_field"),
    hostile("width true", tokens_msg(tokens=b"\x00" * 4, width=True), "bad_field"),
    hostile("width a str", tokens_msg(tokens=b"\x00" * 4, width="2"), "bad_field"),
    hostile("width missing with bin", tokens_msg(tokens=b"\x00" * 4, width=MISSING),
            "bad_field"),
    hostile("width 2, odd length", tokens_msg(tokens=b"\x00" * 3), "bad_field"),
    hostile("width 4, 6 bytes", tokens_msg(tokens=b"\x00" * 6, width=4), "bad_field"),
    hostile("token array with true", tokens_msg(tokens=[1, True], width=MISSING),
            "bad_field"),
    hostile("token array with a float", tokens_msg(tokens=[1, 1.5], width=MISSING),
            "bad_field"),
    hostile("token array with nil", tokens_msg(tokens=[1, None], width=MISSING),
            "bad_field"),
    hostile("predict top_k 0", message(3, type="predict", stream="x", top_k=0),
            "bad_field", 3),
    hostile("predict top_k past vocab", message(type="predict", stream="x", top_k=VOCAB + 1),
            "bad_field"),
    hostile("generate num_tokens 4097", message(type="generate", stream="x",
                                                 num_tokens=4097), "bad_field"),
    hostile("generate temperature NaN", message(type="generate", stream="x",
                                                temperature=float("nan")), "bad_field"),
    hostile("generate temperature 0", message(type="generate", stream="x",
                                              temperature=0), "bad_field"),
    hostile("generate seed -1", message(type="generate", stream="x", seed=-1), "bad_field"),
    hostile("id a float (not echoed)", message(1.5, type="status"), "bad_field"),
    hostile("id bin (not echoed)", message(b"x", type="status"), "bad_field"),
    hostile("id an array (not echoed)", message([1], type="status"), "bad_field"),
    # every reply echoes the id: a long one would be copied into each of them
    hostile("id of 257 bytes (not echoed)", message("i" * 257, type="status"), "bad_field"),
    hostile("id of 129 two-byte characters (not echoed)", tokens_msg("é" * 129),
            "bad_field"),
    hostile("id of 1 MiB in a too large message (not echoed)",
            message("i" * 70_000, type="status"), "too_large"),
    # bad_stream_id
    hostile("stream an int", tokens_msg(4, stream=5), "bad_stream_id", 4),
    hostile("stream bin", tokens_msg(stream=b"bytes"), "bad_stream_id"),
    hostile("stream empty", tokens_msg(stream=""), "bad_stream_id"),
    hostile("stream 65 bytes", tokens_msg(stream="x" * 65), "bad_stream_id"),
    hostile("stream 33 chars, 66 bytes", tokens_msg(stream="é" * 33), "bad_stream_id"),
    hostile("stream with a newline", tokens_msg(stream="a\nb"), "bad_stream_id"),
    hostile("stream with NUL", message(type="position", stream="a\x00b"), "bad_stream_id"),
    hostile("stream with DEL", message(type="predict", stream="a\x7f"), "bad_stream_id"),
    hostile("stream invalid UTF-8", tokens_msg(stream=raw_str(b"a\xffb")), "bad_stream_id"),
    hostile("stream an encoded surrogate", message(type="position",
                                                   stream=raw_str(b"\xed\xa0\x80")),
            "bad_stream_id"),
    hostile("stream missing", tokens_msg(stream=MISSING), "bad_field"),  # nil: bad_stream_id
    hostile("flush stream an int", message(type="flush", stream=5), "bad_stream_id"),
    hostile("end stream an int", message(8, type="end", stream=8), "bad_stream_id", 8),
    hostile("end stream with a tab", message(type="end", stream="a\tb"), "bad_stream_id"),
    hostile("stream an ext", message(type="position", stream=msgpack.ExtType(1, b"ab")),
            "bad_stream_id"),
    # token_out_of_range
    hostile("width 2 token 256", tokens_msg(6, tokens=u16([1, 256])), "token_out_of_range",
            6),
    hostile("width 2 token 65535", tokens_msg(tokens=u16([65535])), "token_out_of_range"),
    hostile("width 4 token 2**32-1", tokens_msg(tokens=u32([2**32 - 1]), width=4),
            "token_out_of_range"),
    hostile("array token 256", tokens_msg(tokens=[255, 256], width=MISSING),
            "token_out_of_range"),
    hostile("array token -1", tokens_msg(tokens=[-1], width=MISSING), "token_out_of_range"),
    hostile("array token 2**64-1", tokens_msg(tokens=[2**64 - 1], width=MISSING),
            "token_out_of_range"),
    hostile("array token -2**63", tokens_msg(tokens=[-2**63], width=MISSING),
            "token_out_of_range"),
    # too_many_tokens
    hostile("1001 tokens, width 2", tokens_msg(7, tokens=u16([0] * 1001)), "too_many_tokens",
            7),
    hostile("1001 tokens, width 4", tokens_msg(tokens=u32([0] * 1001), width=4),
            "too_many_tokens"),
    hostile("1001 tokens as an array", tokens_msg(tokens=[0] * 1001, width=MISSING),
            "too_many_tokens"),
    # gap
    hostile("gap one past the end", tokens_msg("g", stream=GAP_STREAM, offset=GAP_END + 1,
                                               tokens=u16([1, 2])),
            "gap", "g", stream=GAP_STREAM, next_offset=GAP_END),
    hostile("gap at 2**62", tokens_msg(stream=GAP_STREAM, offset=2**62), "gap",
            stream=GAP_STREAM, next_offset=GAP_END),
    hostile("gap on a stream never seen", tokens_msg(stream="never-seen", offset=1,
                                                     tokens=[1], width=MISSING),
            "gap", stream="never-seen", next_offset=0),
]


@pytest.fixture
def client(daemon):
    with RawClient(daemon.endpoint) as c:
        yield c


@pytest.mark.parametrize("case", HAND, ids=[c.label for c in HAND])
def test_each_hostile_class_gets_its_nack(daemon, client, case):
    check_refused(daemon, client, case, 0)


# ---- bugs this file found once (now fixed): they stay fixed -------------------------------
def test_an_id_with_invalid_utf8_is_refused_and_not_fatal(tmp_path):
    d = DaemonProcess(tmp_path, OVERRIDES).start()  # its own daemon: this one may die
    try:
        with RawClient(d.endpoint) as c:
            # {"type": "status", "id": <str holding the byte 0xff>}
            payload = b"\x82\xa4type\xa6status\xa2id\xa1\xff"
            c.socket.send(payload)
            reply, deadline = None, time.monotonic() + 5
            while time.monotonic() < deadline and d.proc.poll() is None:
                if c.socket.poll(100):
                    reply = msgpack.unpackb(c.socket.recv(), raw=False)
                    break
            assert d.proc.poll() is None, "the daemon died"
            assert reply is not None, "no reply"
            # the id cannot be echoed as a valid string: a nack without it
            assert reply["type"] == "nack" and "id" not in reply
            assert reply["reason"] == "bad_field", reply
            assert exchange(c, [encode({"type": "status"})])["type"] == "status"
    finally:
        d.stop()


def test_a_float_width_is_a_bad_field(daemon, client):
    check_refused(daemon, client, hostile(
        "width 2.0", tokens_msg(stream="hostile-float-width", tokens=u16([1, 2]), width=2.0),
        "bad_field"), 0)


def test_an_id_of_256_bytes_is_echoed(daemon, client):
    rid = "é" * 128  # 256 bytes of UTF-8: the longest id there is
    reply = exchange(client, [encode({"type": "position", "stream": "x", "id": rid})])
    assert reply == {"type": "position", "stream": "x", "next_offset": 0, "id": rid}


def test_router_queues_are_bounded_per_connection():
    """ZeroMQ queues this many messages per connection before the daemon reads them: it
    must hold a Producer's whole window, and not ten thousand 2 MiB messages."""
    from harness import free_port
    from streamrnn.client import DEFAULT_WINDOW
    from streamrnn.config import IngestConfig
    from streamrnn.serve.source import Source
    context = zmq.Context()
    source = Source(IngestConfig(endpoint=f"tcp://127.0.0.1:{free_port()}"), context)
    try:
        for queue in (source.socket.rcvhwm, source.socket.sndhwm):
            assert 2 * DEFAULT_WINDOW <= queue <= 8 * DEFAULT_WINDOW, queue
    finally:
        source.close()
        context.term()


def test_a_bool_id_is_a_bad_field(daemon, client):
    check_refused(daemon, client, hostile("id true", message(True, type="status"),
                                          "bad_field"), 0)


# ---- the same classes, generated ---------------------------------------------------------
ids = st.one_of(st.none(), st.integers(-2**63, 2**64 - 1), st.text(max_size=12))
# printable by str.isprintable(), at most 16 characters: at most 64 UTF-8 bytes
stream_names = st.text(st.characters(categories=("L", "M", "N", "P", "S")), min_size=1,
                       max_size=16).filter(str.isprintable)
small_tokens = st.lists(st.integers(0, VOCAB - 1), max_size=40)
valid_tokens = st.one_of(
    small_tokens.map(lambda t: {"tokens": t}),
    small_tokens.map(lambda t: {"tokens": u16(t), "width": 2}),
    small_tokens.map(lambda t: {"tokens": u32(t), "width": 4}))
junk = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                 st.floats(), st.text(max_size=8), st.binary(max_size=8),
                 st.lists(st.integers(0, 9), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=3),
                 st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)))
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\x80",
                b"\xf8\x88\x80\x80\x80", b"\xf4\x90\x80\x80"]


@st.composite
def bad_offsets(draw):
    value = draw(st.one_of(
        st.integers(-2**63, -1), st.integers(2**62 + 1, 2**64 - 1),
        junk.filter(lambda v: type(v) is not int), st.just(MISSING)))
    rid = draw(ids)
    payload = message(rid, type="tokens", stream=draw(stream_names), offset=value,
                      **draw(valid_tokens))
    return hostile(f"offset {value!r}", payload, "bad_field", rid)


@st.composite
def bad_tokens(draw):
    rid, stream = draw(ids), draw(stream_names)
    kind = draw(st.sampled_from(["type", "width", "length", "element"]))
    values = draw(small_tokens)
    if kind == "type":
        tokens = draw(junk.filter(lambda v: not isinstance(v, (bytes, list))) |
                      st.just(MISSING))
        fields = {"tokens": tokens}
    elif kind == "width":
        # 2.0 and 4.0 are left out: test_a_float_width_is_a_bad_field covers them
        width = draw(st.one_of(
            st.just(MISSING), st.integers(-2**63, 2**64 - 1).filter(lambda w: w not in (1, 2, 4)),
            junk.filter(lambda w: type(w) is not int and w not in (2, 4))))
        fields = {"tokens": u32(values), "width": width}
    elif kind == "length":
        width = draw(st.sampled_from([2, 4]))
        data = draw(st.binary(max_size=60).filter(lambda b: len(b) % width))
        fields = {"tokens": data, "width": width}
    else:
        bad = draw(junk.filter(lambda v: type(v) is not int))
        at = draw(st.integers(0, len(values)))
        fields = {"tokens": values[:at] + [bad] + values[at:]}
    payload = message(rid, type="tokens", stream=stream, offset=0, **fields)
    return hostile(f"tokens {kind}: {fields}", payload, "bad_field", rid)


@st.composite
def bad_other_fields(draw):
    rid, stream = draw(ids), draw(stream_names)
    kind, key, value = draw(st.one_of(
        st.tuples(st.just("predict"), st.just("top_k"), st.one_of(
            st.integers(-2**63, 0), st.integers(VOCAB + 1, 2**64 - 1),
            junk.filter(lambda v: type(v) is not int)).filter(lambda v: v is not None)),
        st.tuples(st.just("generate"), st.just("num_tokens"), st.one_of(
            st.integers(-2**63, 0), st.integers(4097, 2**64 - 1),
            junk.filter(lambda v: type(v) is not int))),
        st.tuples(st.just("generate"), st.just("temperature"), st.one_of(
            st.floats().filter(lambda t: not 0.01 <= t <= 100),
            st.integers(-2**63, 0), st.integers(101, 2**64 - 1),
            junk.filter(lambda v: not isinstance(v, (int, float))))),
        st.tuples(st.just("generate"), st.just("seed"), st.one_of(
            st.integers(-2**63, -1), st.integers(2**63, 2**64 - 1),
            junk.filter(lambda v: type(v) is not int)))))
    # a nil top_k is "missing" and takes the default: left out above
    return hostile(f"{kind} {key}={value!r}", message(rid, type=kind, stream=stream,
                                                       **{key: value}), "bad_field", rid)


@st.composite
def bad_ids(draw):
    rid = draw(junk.filter(lambda v: v is not None and not isinstance(v, (int, str))))
    kind = draw(st.sampled_from(["status", "position", "tokens", "end"]))
    payload = {"type": kind, "stream": "x", "offset": 0, "tokens": [], "id": rid}
    return hostile(f"id {rid!r}", payload, "bad_field")  # an unreadable id is not echoed


@st.composite
def bad_streams(draw):
    rid = draw(ids)
    kind = draw(st.sampled_from(["tokens", "position", "predict", "generate", "flush",
                                 "end"]))
    choice = draw(st.sampled_from(["junk", "empty", "long", "wide", "control", "utf8"]))
    if choice == "junk":
        value = draw(junk.filter(lambda v: not isinstance(v, str)) | st.just(MISSING))
        if kind == "flush" and value in (None, MISSING):
            value = 0  # a flush without a stream is a flush of all of them
    elif choice == "empty":
        value = ""
    elif choice == "long":
        value = draw(st.text(st.characters(codec="ascii", categories=("L", "N")),
                             min_size=MAX_STREAM_BYTES + 1, max_size=100))
    elif choice == "wide":  # few enough characters, too many bytes
        value = draw(st.sampled_from(["é", "€", "😀"])) * draw(st.integers(17, 64))
        assume(len(value.encode()) > MAX_STREAM_BYTES)
    elif choice == "control":
        name = draw(stream_names)[:15]  # 16 characters with the control one
        at = draw(st.integers(0, len(name)))
        control = chr(draw(st.one_of(st.integers(0, 31), st.integers(127, 159))))
        value = name[:at] + control + name[at:]
    else:
        # whole characters around one invalid sequence: at most 8 + 5 + 32 bytes
        before, after = draw(stream_names.map(lambda s: s[:8])), draw(stream_names)
        data = before.encode() + draw(st.sampled_from(INVALID_UTF8)) + after.encode()
        with pytest.raises(UnicodeDecodeError):
            data.decode()
        value = raw_str(data)
    payload = message(rid, type=kind, stream=value, offset=0, tokens=[])
    reason = "bad_field" if value is MISSING else "bad_stream_id"  # absent, not wrong
    return hostile(f"{kind} stream {value!r}", payload, reason, rid)


@st.composite
def unknown_types(draw):
    rid = draw(ids)
    value = draw(st.one_of(
        st.just(MISSING), junk.filter(lambda v: not isinstance(v, str)),
        st.text(max_size=12).filter(lambda t: t not in REQUEST_TYPES),
        st.sampled_from(REQUEST_TYPES).map(str.upper),
        st.sampled_from(REQUEST_TYPES).map(lambda t: t + " "),
        st.sampled_from(REQUEST_TYPES).map(lambda t: raw_str(t.encode() + b"\xff"))))
    payload = message(rid, type=value, stream=draw(stream_names), offset=0, tokens=[])
    return hostile(f"type {value!r}", payload, "unknown_type", rid)


@st.composite
def out_of_range(draw):
    rid, stream = draw(ids), draw(stream_names)
    values = draw(st.lists(st.integers(0, VOCAB - 1), max_size=200))
    width = draw(st.sampled_from([2, 4, "array"]))
    high = {2: 2**16 - 1, 4: 2**32 - 1, "array": 2**64 - 1}[width]
    bad = draw(st.integers(VOCAB, high) | (st.integers(-2**63, -1) if width == "array"
                                          else st.nothing()))
    at = draw(st.integers(0, len(values)))
    values = values[:at] + [bad] + values[at:]
    fields = ({"tokens": values} if width == "array" else
              {"tokens": u16(values) if width == 2 else u32(values), "width": width})
    payload = message(rid, type="tokens", stream=stream, offset=0, **fields)
    return hostile(f"token {bad} of {len(values)}, width {width}", payload,
                   "token_out_of_range", rid)


@st.composite
def too_many(draw):
    rid, stream = draw(ids), draw(stream_names)
    count = draw(st.integers(MAX_TOKENS + 1, 4 * MAX_TOKENS))
    values = np.random.default_rng(draw(st.integers(0, 2**32))).integers(0, VOCAB, count)
    width = draw(st.sampled_from([2, 4, "array"]))
    fields = ({"tokens": values.tolist()} if width == "array" else
              {"tokens": u16(values) if width == 2 else u32(values), "width": width})
    payload = message(rid, type="tokens", stream=stream, offset=0, **fields)
    return hostile(f"{count} tokens, width {width}", payload, "too_many_tokens", rid)


@st.composite
def gaps(draw):
    rid = draw(ids)
    if draw(st.booleans()):
        stream, end = GAP_STREAM, GAP_END
    else:  # a stream no test ever gives tokens to
        stream, end = "fresh/" + draw(stream_names.map(lambda s: s[:8])), 0
    offset = draw(st.integers(end + 1, end + 5) | st.integers(end + 1, 2**62))
    payload = message(rid, type="tokens", stream=stream, offset=offset,
                      **draw(valid_tokens))
    return hostile(f"gap at {offset} on {stream!r}", payload, "gap", rid, stream=stream,
                   next_offset=end)


@st.composite
def too_large(draw):
    size = draw(st.integers(MAX_BYTES + 1, 2 * MAX_BYTES))
    if draw(st.booleans()):  # garbage: nothing to read an id from
        body = random.Random(draw(st.integers(0, 2**32))).randbytes(size - 1)
        return hostile(f"{size} bytes of garbage", b"\xc1" + body, "too_large")
    rid, pad = draw(ids), size
    for _ in range(3):  # fit the padding to the size (its bin header grows with it)
        payload = encode(tokens_msg(rid, tokens=bytes(pad)))
        pad += size - len(payload)
    assert len(payload) == size, (len(payload), size)
    return hostile(f"a map of {len(payload)} bytes", payload, "too_large", rid)


def classify(payload: bytes) -> str | None:
    """The reason for arbitrary bytes, from decoding them ourselves: a map (vanishingly
    rare) we do not classify. Invalid UTF-8 is decoded the daemon's way, not raised."""
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True,
                                unicode_errors="surrogateescape")
    except Exception:
        return "malformed"
    return None if isinstance(value, dict) else "malformed"


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["bytes", "not a map", "truncated", "trailing", "forged",
                                 "forged field", "nesting", "key", "frames"]))
    valid = encode(message(draw(ids), type="tokens", stream=draw(stream_names), offset=0,
                           **draw(valid_tokens)))
    if kind == "bytes":
        payload = draw(st.binary(max_size=200))
        assume(classify(payload) is not None)
    elif kind == "not a map":
        payload = encode(draw(junk.filter(lambda v: not isinstance(v, dict)) |
                              st.lists(junk, max_size=4)))
    elif kind == "truncated":
        payload = valid[:draw(st.integers(0, len(valid) - 1))]
    elif kind == "trailing":
        payload = valid + draw(st.binary(min_size=1, max_size=16))
    elif kind in ("forged", "forged field"):
        header = draw(st.sampled_from([b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9",
                                       b"\xdc", b"\xde", b"\xc5", b"\xda", b"\xc8"]))
        if header in (b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9"):
            length = draw(st.integers(2**17, 2**32 - 1)).to_bytes(4, "big")
        else:
            length = draw(st.integers(2**10, 2**16 - 1)).to_bytes(2, "big")
        forged = header + length + (b"\x01" if header in (b"\xc9", b"\xc8") else b"") + \
            draw(st.binary(max_size=60))
        payload = forged if kind == "forged" else encode(
            message(draw(ids), type="tokens", stream="x", offset=0, width=2,
                    tokens=Raw(forged)))
    elif kind == "nesting":
        depth = draw(st.integers(1100, 20_000))
        level = draw(st.sampled_from([b"\x91", b"\x81\xa1a", b"\xdc\x00\x01"]))
        payload = level * depth + b"\xc0"
    elif kind == "key":
        key = draw(st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(), st.none(),
                             st.booleans()))
        payload = encode({"type": "status", key: 1} if draw(st.booleans())
                         else {key: "status"})
    else:  # a DEALER request must be one frame
        frames = draw(st.lists(st.binary(max_size=12), min_size=1, max_size=3))
        frames = frames + [valid]
        if len(frames) == 2 and frames[0] == b"":
            frames[0] = b"\x00"  # [empty, payload] is how a REQ socket talks: fine
        return Hostile(f"{len(frames)} frames", frames, "malformed")
    return hostile(f"malformed {kind}", payload, "malformed")


hostile_messages = st.one_of(malformed(), too_large(), unknown_types(), bad_offsets(),
                             bad_tokens(), bad_other_fields(), bad_ids(), bad_streams(),
                             out_of_range(), too_many(), gaps())


class GoodProducer(threading.Thread):
    """Feeds stream "good" with known data, politely, until told to stop; then flushes."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.stopping = threading.Event()
        self.sent = 0
        self.start_position: int | None = None
        self.flushed = False
        self.error: BaseException | None = None

    def run(self) -> None:
        context = zmq.Context()
        rng = np.random.default_rng(1234)
        try:
            # a generous reply timeout: no resends, so no gap nacks of its own to count
            with Producer(self.endpoint, context=context, max_tokens_per_message=MAX_TOKENS,
                          reply_timeout=30, retry_seconds=60) as producer:
                self.start_position = producer.position("good")
                while not self.stopping.is_set():
                    chunk = rng.integers(0, VOCAB, 64)
                    producer.send("good", chunk)
                    self.sent += len(chunk)
                    producer.flush(timeout=60)
                    # paced by the training: a loaded CI machine trains a few hundred
                    # tokens a second, and the test waits for all of them at the end
                    while not self.stopping.is_set() and \
                            producer.status()["queued_tokens"] > 2 * len(chunk):
                        time.sleep(0.02)
                producer.flush(timeout=60)
                self.flushed = True
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            context.term()


def test_hostile_input_while_a_good_producer_trains(daemon):
    counts: Counter[str] = Counter()
    sequence = iter(range(1, 10**9))
    with RawClient(daemon.endpoint) as client:
        start = wait_drained(client)  # what earlier tests sent is trained: a clean baseline
        before = rejected(scrape(daemon))
        good = GoodProducer(daemon.endpoint)
        good.start()
        try:
            # warm-up: every class by hand once, then the resident set size
            for case in HAND:
                check_refused(daemon, client, case, next(sequence))
                counts[case.reason] += 1
            rss_warm = rss_bytes(daemon.proc.pid)

            @settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow,
                                             HealthCheck.data_too_large,
                                             HealthCheck.large_base_example,
                                             HealthCheck.filter_too_much])
            @given(case=hostile_messages)
            def throw(case: Hostile) -> None:
                assert good.error is None, f"the good producer failed: {good.error!r}"
                check_refused(daemon, client, case, next(sequence))
                counts[case.reason] += 1

            throw()
            rss_end = rss_bytes(daemon.proc.pid)
        finally:
            good.stopping.set()
            good.join(timeout=120)

        # the good stream: everything sent was acknowledged, received once and trained
        assert not good.is_alive(), "the good producer never finished its flush"
        assert good.error is None, f"the good producer failed: {good.error!r}"
        assert good.flushed and good.start_position == 0 and good.sent > 0
        position = exchange(client, [encode({"type": "position", "stream": "good"})])
        assert position["next_offset"] == good.sent
        end = wait_drained(client)
        assert end["tokens_received"] - start["tokens_received"] == good.sent
        assert end["streams"] - start["streams"] == 1
        # a stream of n tokens has n - 1 targets, all trained once the queue is empty
        assert end["tokens_trained"] - start["tokens_trained"] == good.sent - 1

    # every refusal counted under its reason, and nothing else refused
    after = rejected(scrape(daemon))
    growth = {reason: after[reason] - before.get(reason, 0) for reason in after}
    assert growth == {reason: float(counts.get(reason, 0)) for reason in after}, counts
    assert set(counts) <= set(after)

    # hostile messages leave nothing behind
    assert rss_end - rss_warm < 150 * 2**20, \
        f"resident memory grew {(rss_end - rss_warm) / 2**20:.0f} MiB"
    assert daemon.proc.poll() is None
