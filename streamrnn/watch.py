"""`streamrnn watch`: tail -f for the lines the model did not expect.

It subscribes to the line records of the daemon's score feed (every rank's, found from
the ingest endpoint) and prints the lines that pass its filter: by default those
scoring at least 0.999 among their stream's recent lines; --top-quantile Q, --above
BITS_PER_TOKEN, or --all instead. On a terminal each line shows its score and bits per
token, its surprising tokens highlighted; --json prints one object per line record.
Dropped records (this reader fell behind) and daemon restarts are said on stderr.
"""
from __future__ import annotations

import json
import sys
from typing import TextIO

import numpy as np

from .client import Scores, score_endpoints

HIGHLIGHT, PLAIN = "\x1b[1;31m", "\x1b[0m"


def run(endpoint: str, feeds: list[str], streams: list[str], show_all: bool,
        above: float | None, top_quantile: float, as_json: bool,
        keys: tuple[str | None, str | None], out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
    server_key, client_key = keys
    try:
        feeds = feeds or score_endpoints(endpoint, 5.0, server_key, client_key)
    except Exception as e:  # ProducerError, ValueError: say it, exit 1
        print(f"streamrnn watch: {e}", file=err)
        return 1
    shown = (lambda r: True) if show_all else (
        (lambda r: r["bits_per_token"] > above) if above is not None else
        (lambda r: r["score"] >= top_quantile))
    colour = not as_json and out.isatty()
    print(f"streamrnn watch: {', '.join(feeds)}" + (f", streams {', '.join(streams)}"
                                                     if streams else ""), file=err)
    try:
        with Scores(feeds, streams or None, ("line",), server_key=server_key,
                    client_key=client_key) as scores:
            for record in scores:
                if record.get("kind") != "line":
                    continue
                if record["missed"]:
                    print(f"streamrnn watch: {record['missed']} records of stream "
                          f"{record['stream']!r} dropped (this reader fell behind)", file=err)
                if record["restarted"]:
                    print(f"streamrnn watch: the daemon restarted (stream "
                          f"{record['stream']!r}); replayed lines may come again",
                          file=err)
                if shown(record):
                    print(as_json_line(record) if as_json else
                          as_text(record, colour), file=out, flush=True)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `watch | head`: the reader has gone
        sys.stdout = None
        return 0
    return 0


def as_json_line(record: dict) -> str:
    fields = {k: v for k, v in record.items() if k not in ("text", "token_bits")}
    fields["text"] = record["text"].decode("utf-8", "replace") \
        if isinstance(record["text"], bytes) else record["text"]
    fields["token_bits"] = [round(float(b), 3) for b in record["token_bits"]]
    return json.dumps(fields, ensure_ascii=False)


def as_text(record: dict, colour: bool) -> str:
    text, bits = record["text"], record["token_bits"]
    head = (f"{record['stream']}:{record['line']}  score {record['score']:.3f}  "
            f"{record['bits_per_token']:.2f} bits/token"
            + ("" if record["complete"] else "  (seen from its middle)"))
    if not isinstance(text, bytes):
        return f"{head}  tokens {list(np.frombuffer(text, '<i4'))}"
    # surprising: a token that cost far more than the line's typical one
    loud = bits > max(4.0, 2 * float(np.median(bits))) if len(bits) else bits
    start, end = (HIGHLIGHT, PLAIN) if colour else ("[", "]")
    pieces, inside = [], False
    for i, byte in enumerate(text.rstrip(b"\n")):
        surprising = i < len(loud) and bool(loud[i])
        if surprising != inside:  # one mark around each run of surprising bytes
            pieces.append(start if surprising else end)
            inside = surprising
        pieces.append(chr(byte) if 32 <= byte < 127 else f"\\x{byte:02x}")
    return f"{head}\n  {''.join(pieces)}{end if inside else ''}"
