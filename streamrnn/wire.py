"""The wire protocol: msgpack maps over ZeroMQ, decoded and checked without trusting them.

Pure functions, no sockets and no torch: `decode` turns one untrusted payload into a
request or a `Refusal` (reason code + message), `encode_*` build the payloads. The
daemon (source.py) and the producer client (client.py) share them; README.md,
"Wire protocol", is the specification they implement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

# Refusal reasons: stable, machine-readable, one counter label each.
REASONS = ("malformed", "too_large", "unknown_type", "bad_field", "bad_stream_id",
           "too_many_tokens", "token_out_of_range", "gap", "too_many_streams",
           "backlogged", "ended", "internal", "moved")
REQUEST_TYPES = ("tokens", "position", "status", "predict", "generate", "flush",
                 "checkpoint", "end", "topology")
MAX_GENERATE = 4096
MAX_OFFSET = 2**62
WIDTHS = {1: "<u1", 2: "<u2", 4: "<u4"}  # bin tokens: bytes per token -> numpy dtype
MAX_ID_BYTES = 256  # every reply echoes the id: a longer one would multiply what a reply costs


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_message_bytes: int
    max_tokens_per_message: int
    max_stream_id_bytes: int


@dataclass(frozen=True)
class Refusal:
    reason: str       # one of REASONS
    message: str      # for a human
    request_id: Any = None


@dataclass(frozen=True)
class Request:
    type: str                  # one of REQUEST_TYPES
    request_id: Any = None     # the producer's "id", echoed in the reply
    stream: str | None = None
    offset: int = 0            # tokens: position of the first token in the stream
    tokens: np.ndarray | None = None  # tokens: int32, each < vocab_size
    top_k: int = 10            # predict
    num_tokens: int = 0        # generate
    temperature: float = 1.0   # generate
    seed: int = 0              # generate


MAX_KEYS = 16  # keys in a request map (and in any map inside one)


def decode(payload: bytes, limits: Limits) -> Request | Refusal:
    """One message from the network -> a checked Request, or the reason it is refused."""
    if len(payload) > limits.max_message_bytes:
        return Refusal("too_large", f"message of {len(payload)} bytes; the limit is "
                       f"{limits.max_message_bytes} (ingest.max_message_bytes)",
                       _request_id(payload))
    try:
        message = _unpack(payload)
    except Exception as e:  # msgpack raises several types; all mean "not a message"
        if "exceeds max_map_len" in str(e):
            return _too_many_keys(payload)
        return Refusal("malformed", f"not a msgpack message ({_unpack_problem(payload, e)})")
    if not isinstance(message, dict):
        return Refusal("malformed", f"a request must be a msgpack map; this is "
                       f"{_kind(message)}")
    request_id = message.get("id")
    if request_id is not None and not _valid_id(request_id):
        return Refusal("bad_field", "id must be an integer (64 bits) or a UTF-8 string "
                       f"of at most {MAX_ID_BYTES} bytes; this one is {_described(request_id)}")
    try:
        return _decode_fields(message, request_id, limits)
    except _Refused as e:
        return Refusal(e.reason, e.message, request_id)


def _unpack(payload: bytes) -> Any:
    # every other max_*_len follows from len(payload), so a forged length cannot
    # allocate more than the message itself; hostile nesting raises StackError, caught
    # by the caller; invalid UTF-8 survives as surrogates, so a bad stream id is
    # refused by name
    return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_map_len=MAX_KEYS,
                           unicode_errors="surrogateescape")


def _unpack_problem(payload: bytes, error: Exception) -> str:
    """Why msgpack could not read a payload, in a few words for the producer."""
    text = str(error)
    if not payload:
        return "an empty frame"
    if isinstance(error, msgpack.StackError):
        return "nested too deeply"
    if isinstance(error, msgpack.ExtraData):
        return "bytes left over after the first value: one message per frame"
    if isinstance(error, msgpack.FormatError):
        return "a byte that starts no msgpack value, such as 0xc1"
    if "incomplete input" in text:
        return "it ends in the middle of a value: truncated?"
    if "is not allowed for map key" in text:
        return "map keys must be strings"
    if "exceeds max_" in text:
        return "a length header larger than the message"
    return "unreadable"


def _too_many_keys(payload: bytes) -> Refusal:
    """A map of more than MAX_KEYS keys somewhere. Read again with the bound the payload
    itself sets (a key and its value take two bytes at least), so a forged map length,
    at the top or inside, is still malformed, and a real message's id is found."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True,
                                  max_map_len=len(payload) // 2,
                                  unicode_errors="surrogateescape")
    except Exception as e:
        return Refusal("malformed", f"not a msgpack message ({_unpack_problem(payload, e)})")
    if not isinstance(message, dict):
        return Refusal("malformed", f"a request must be a msgpack map; this is "
                       f"{_kind(message)}")
    request_id = message.get("id")
    request_id = request_id if _valid_id(request_id) else None
    if len(message) <= MAX_KEYS:  # the request is fine; a map inside it is not
        return Refusal("bad_field", f"a map inside a request has at most {MAX_KEYS} keys",
                       request_id)
    return Refusal("bad_field", f"a request has at most {MAX_KEYS} keys; this one has "
                   f"{len(message)}", request_id)


def _request_id(payload: bytes) -> Any:
    """The id of a message refused for its size, so the producer knows which one it was
    (the socket's MAXMSGSIZE keeps this read bounded to twice the limit)."""
    try:
        message = _unpack(payload)
    except Exception as e:
        return _too_many_keys(payload).request_id if "exceeds max_map_len" in str(e) \
            else None
    request_id = message.get("id") if isinstance(message, dict) else None
    return request_id if _valid_id(request_id) else None


def _kind(value: Any) -> str:
    """A value's msgpack type, for messages: "an int", "nil", "bin", ..."""
    if value is None:
        return "nil"
    for python, name in ((bool, "a bool"), (int, "an int"), (float, "a float"),
                         (str, "a str"), (bytes, "bin"), (list, "an array"),
                         (dict, "a map"), (msgpack.ExtType, "an ext")):
        if isinstance(value, python):
            return name
    return "a value of another kind"


def _described(value: Any) -> str:
    """What a refused value is, for messages: "a str of 300 bytes", "an int out of range"."""
    if isinstance(value, str):
        try:
            return f"a str of {len(value.encode('utf-8'))} bytes"
        except UnicodeEncodeError:
            return "a str that is not valid UTF-8"
    if type(value) is int:
        return f"the int {value}"
    return _kind(value)


def _valid_id(value: Any) -> bool:
    """An id the reply can carry back: an int (not a bool) or a string of real UTF-8, at
    most MAX_ID_BYTES long."""
    if type(value) is int:
        return -2**63 <= value < 2**64
    if isinstance(value, str):
        try:
            return len(value.encode("utf-8")) <= MAX_ID_BYTES
        except UnicodeEncodeError:  # invalid UTF-8 decoded as surrogates
            return False
    return False


class _Refused(Exception):
    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message


def _decode_fields(m: dict, request_id: Any, limits: Limits) -> Request:
    kind = m.get("type")
    if kind not in REQUEST_TYPES:
        raise _Refused("unknown_type", _type_problem(m))
    if kind in ("status", "checkpoint", "topology"):
        return Request(kind, request_id)
    if kind == "flush" and m.get("stream") is None:
        return Request("flush", request_id)
    if "stream" not in m:
        raise _Refused("bad_field", f"stream is missing: a {kind} request names its stream")
    stream = _stream_id(m["stream"], limits)
    if kind in ("position", "flush", "end"):
        return Request(kind, request_id, stream)
    if kind == "predict":
        top_k = _int(m, "top_k", 10, 1, limits.vocab_size, "model.vocab_size")
        return Request("predict", request_id, stream, top_k=top_k)
    if kind == "generate":
        temperature = m.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise _Refused("bad_field", "temperature must be a number in 0.01 .. 100; "
                           f"this one is {_kind(temperature)}")
        if not 0.01 <= temperature <= 100:
            raise _Refused("bad_field", f"temperature = {temperature} is outside 0.01 .. 100")
        return Request("generate", request_id, stream,
                       num_tokens=_int(m, "num_tokens", 200, 1, MAX_GENERATE),
                       temperature=float(temperature), seed=_int(m, "seed", 0, 0, 2**63 - 1))
    offset = _int(m, "offset", None, 0, MAX_OFFSET)
    return Request("tokens", request_id, stream, offset=offset,
                   tokens=_tokens(m, limits))


def _type_problem(m: dict) -> str:
    kinds = ", ".join(REQUEST_TYPES)
    if "type" not in m:
        return f"type is missing: every request has one, one of: {kinds}"
    kind = m["type"]
    if not isinstance(kind, str):
        return f"type must be a string, one of: {kinds}; this one is {_kind(kind)}"
    try:
        kind.encode("utf-8")
    except UnicodeEncodeError:
        return f"type is not valid UTF-8; it is one of: {kinds}"
    shown = kind if len(kind) <= 40 else kind[:40] + "..."
    return f"type {shown!r} is not one of: {kinds}"


def _stream_id(value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise _Refused("bad_stream_id", "stream must be a string (msgpack str, UTF-8); "
                       f"this one is {_kind(value)}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Refused("bad_stream_id", "stream id is not valid UTF-8") from None
    if not 1 <= size <= limits.max_stream_id_bytes:
        raise _Refused("bad_stream_id", f"stream id of {size} bytes; allowed 1 .. "
                       f"{limits.max_stream_id_bytes} (ingest.max_stream_id_bytes)")
    if not value.isprintable():
        raise _Refused("bad_stream_id", "stream id must be printable (no control characters)")
    return value


def _int(m: dict, key: str, default: int | None, low: int, high: int,
         setting: str = "") -> int:
    if key not in m and default is None:
        raise _Refused("bad_field", f"{key} is missing")
    value = m.get(key, default)  # nil is a value, and not an integer
    bounds = f"{low} .. {high}" + (f" ({setting})" if setting else "")
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Refused("bad_field", f"{key} must be an integer in {bounds}; this one is "
                       f"{_kind(value)}")
    if not low <= value <= high:
        raise _Refused("bad_field", f"{key} = {value} is outside {bounds}")
    return value


def _tokens(m: dict, limits: Limits) -> np.ndarray:
    raw = m.get("tokens")
    if isinstance(raw, bytes):
        width = m.get("width")
        if type(width) is not int or width not in WIDTHS:
            problem = "missing" if "width" not in m else (
                f"{width}" if type(width) is int else _kind(width))
            raise _Refused("bad_field", "width must be 1 (uint8), 2 (uint16) or 4 (uint32) "
                           f"when tokens is bin; it is {problem}")
        if len(raw) % width:
            raise _Refused("bad_field", f"tokens has {len(raw)} bytes, not a multiple of "
                           f"width {width}")
        _count(len(raw) // width, limits)
        tokens = np.frombuffer(raw, WIDTHS[width]).astype(np.int64)
    elif isinstance(raw, list):
        _count(len(raw), limits)
        if not all(type(t) is int for t in raw):  # bool is not a token
            bad = next(t for t in raw if type(t) is not int)
            raise _Refused("bad_field", "tokens as an array must hold integers only; it "
                           f"holds {_kind(bad)}")
        if raw and (min(raw) < -2**63 or max(raw) >= 2**63):
            raise _Refused("token_out_of_range", "token ids must fit in 64 bits")
        tokens = np.array(raw, np.int64)
    else:
        raise _Refused("bad_field", "tokens must be bin (little-endian unsigned integers of "
                       "width bytes each) or an array of integers; "
                       + ("it is missing" if "tokens" not in m else
                          f"this one is {_kind(raw)}"))
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= limits.vocab_size):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise _Refused("token_out_of_range", f"token {bad} is outside 0 .. "
                       f"{limits.vocab_size - 1} (model.vocab_size)")
    return tokens.astype(np.int32)


def _count(num_tokens: int, limits: Limits) -> None:
    if num_tokens > limits.max_tokens_per_message:
        raise _Refused("too_many_tokens", f"{num_tokens} tokens in one message; the limit "
                       f"is {limits.max_tokens_per_message} (ingest.max_tokens_per_message)")


# ---- building messages (both sides) ----------------------------------------------------
def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def token_array(tokens: Any) -> np.ndarray:
    """Tokens as a 1-D integer array that fits the wire (0 .. 2**32 - 1), or ValueError.
    Checked before anything is sent: a cast would turn -1 into 65535, 2.7 into 2 and
    2**32 + 7 into 7, and the daemon would train on tokens nobody sent."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"tokens must be a flat sequence, got {array.ndim} dimensions")
    if len(array) == 0:
        return array.astype(np.int64)  # [] is float64 to numpy; nothing to check
    values = array.tolist() if array.dtype == object else None
    if values is not None and all(type(t) is int for t in values):
        low, high = min(values), max(values)  # ints past 64 bits: numpy keeps objects
    elif array.dtype.kind not in "iu":  # bool, float, str, ...
        raise ValueError(f"tokens must be integers, got {array.dtype} values such as "
                         f"{array[:1].tolist()[0]!r}")
    else:
        low, high = int(array.min()), int(array.max())
    if low < 0:
        raise ValueError(f"token {low} is negative: token ids are 0 .. {2**32 - 1}")
    if high >= 2**32:
        raise ValueError(f"token {high} does not fit the wire's 32 bits "
                         f"(token ids are 0 .. {2**32 - 1})")
    return array.astype(np.int64) if values is not None else array


def encode_tokens(stream: str, offset: int, tokens: Any, request_id: Any = None,
                  width: int | None = None) -> bytes:
    """A tokens message; tokens travel as little-endian unsigned integers of the
    narrowest width they fit: 1 byte (all < 256), 2 (< 2**16), else 4. Tokens that are
    not integers in 0 .. 2**32 - 1 (or 2**(8 * width) - 1 for a given width) raise
    ValueError."""
    tokens = token_array(tokens)
    high = int(tokens.max()) if len(tokens) else 0
    if width is None:
        width = 1 if high < 2**8 else 2 if high < 2**16 else 4
    elif type(width) is not int or width not in WIDTHS:
        raise ValueError(f"width must be 1, 2 or 4, got {width!r}")
    elif high >= 2**(8 * width):
        raise ValueError(f"token {high} does not fit width {width} "
                         f"(at most {2**(8 * width) - 1})")
    data = tokens.astype(WIDTHS[width]).tobytes()
    message = {"type": "tokens", "stream": stream, "offset": int(offset), "tokens": data,
               "width": width}
    if request_id is not None:
        message["id"] = request_id
    return pack(message)


def refusal_reply(refusal: Refusal, **extra: Any) -> dict:
    reply = {"type": "nack", "reason": refusal.reason, "message": refusal.message, **extra}
    if refusal.request_id is not None:
        reply["id"] = refusal.request_id
    return reply
