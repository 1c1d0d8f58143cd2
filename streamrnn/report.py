"""What `streamrnn status` and `streamrnn checkpoint` print for people: plain functions
from the daemon's replies (or a checkpoint's summary row) to text; `--json` skips them."""
from __future__ import annotations

import os
import time


def format_checkpoint(row: dict, full: bool) -> str:
    """A committed checkpoint (statedir.listing / inspect's row)."""
    if "error" in row:
        return f"{row['path']}: UNREADABLE: {row['error']}"
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
    ranks = f"{row['ranks']} rank" + ("" if row["ranks"] == 1 else "s")
    counts = "" if row["streams"] is None else (
        f", {row['streams']:,} stream{'' if row['streams'] == 1 else 's'}, "
        f"{row['tokens_trained']:,} tokens trained, " +
        (f"{row['bits_per_token']:.3f}" if row["bits_per_token"] is not None else "-") +
        " bits/token")
    line = (f"{row['path']}: {created}, {ranks}, {row['updates']:,} updates{counts}, log "
            f"position{'s' if len(row['log_positions']) > 1 else ''} "
            f"{', '.join(f'{p:,}' for p in row['log_positions'])}"
            + (f" (streamrnn {row['legacy']}: taken over at the next start)"
               if row.get("legacy") else "")
            + ("  <- the next start loads this one" if row.get("next_start") else ""))
    if not full:
        return line
    model, train = row["config"]["model"], row["config"]["train"]
    return "\n".join([line, f"  model: {model['kind']} {model['num_layers']}x"
                      f"{model['hidden_size']}, vocab {model['vocab_size']}, embed "
                      f"{model['embed_dim']}" + (", skip connections" if model.get("skip")
                                                 else "")  # absent before 0.2
                      + f"; TBPTT({train['k1']}, {train['k2']}), {train['optimizer']} lr "
                      f"{train['lr']}", f"  version {row['version']}"])


def format_status(s: dict) -> str:
    return "\n".join([
        f"streamrnn {s['version']} on {s['device']}, up {_uptime(s['uptime_seconds'])}: "
        f"{s['model']}, TBPTT({s['tbptt'][0]}, {s['tbptt'][1]})",
        *_status_counts(s),
        f"last checkpoint {format_saved(s['last_checkpoint'])}",
    ])


def format_cluster_status(cluster: dict) -> str:
    """A line per rank, then the cluster's totals (Producer.cluster_status())."""
    answered = [r for r in cluster["ranks"] if "error" not in r]
    size = f"a cluster of {cluster['world_size']} ranks (generation {cluster['generation']})"
    ranks = [_rank_line(r) for r in cluster["ranks"]]
    if not answered:
        return "\n".join([f"{size}: no rank answered", *ranks])
    s = answered[0]  # every rank runs the same config
    return "\n".join([f"streamrnn {s['version']}, {size}: {s['model']}, "
                      f"TBPTT({s['tbptt'][0]}, {s['tbptt'][1]})",
                      *ranks, *_status_counts(cluster["totals"])])


def _rank_line(r: dict) -> str:
    where = f"rank {r['rank']}  {r['endpoint']}  "
    if "error" in r:
        return where + r["error"]
    bits = r.get("recent_bits_per_token")
    streams = f"{r['streams']:,} stream" + ("" if r["streams"] == 1 else "s")
    return (where + f"{r['device']}, up {_uptime(r['uptime_seconds'])}, {streams}, "
            f"{r['tokens_received']:,} tokens received ({r['queued_tokens']:,} "
            f"queued), {r['tokens_trained']:,} trained, "
            f"{r['recent_tokens_per_second']:,.0f} tokens/s"
            + (f", {bits:.3f} bits/token" if bits is not None else ""))


def _status_counts(s: dict) -> list[str]:
    bits = s.get("recent_bits_per_token")
    return [
        f"updates         {s['updates']:,}",
        f"streams         {s['streams']:,}",
        f"tokens received {s['tokens_received']:,}  (queued, not trained yet: "
        f"{s['queued_tokens']:,})",
        f"tokens trained  {s['tokens_trained']:,}  ({s['bits'] / max(1, s['tokens_trained']):.3f}"
        f" bits/token over the model's life)",
        f"recent          {s['recent_tokens_per_second']:,.0f} tokens/s, "
        + (f"{bits:.3f} bits/token" if bits is not None else "no training in the last minute"),
    ]


def _uptime(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"


def format_saved(saved: dict | None) -> str:
    """The status's last checkpoint: path, log position and how long ago it was written.
    The age comes from the daemon when it says (`created`), else from the file itself,
    which is found when status runs on the daemon's host (a relative path: in the
    daemon's working folder)."""
    if not saved:
        return "none yet"
    created = saved.get("created")
    if created is None:
        try:
            created = os.stat(saved["path"]).st_mtime
        except OSError:
            pass
    age = ("age unknown: the file is not readable from here" if created is None
           else f"written {_duration(time.time() - created)} ago")
    return f"{saved['path']} (log position {saved['wal_seq']:,}, {age})"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
