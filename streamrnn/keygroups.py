"""Which rank owns a stream: key groups, as Flink assigns them.

A stream id belongs to one of `num_groups` key groups, fixed when a cluster first starts
(stored in its checkpoints, never changed), and each of the `world_size` ranks owns a
contiguous range of groups:

    group = CRC-32(stream id as UTF-8) mod num_groups     (never Python's salted hash())
    rank  = group * world_size // num_groups

The daemon, the producer client and `streamrnn feed` compute the same owner from the
same two numbers, which `topology` replies carry. A restart with another world size
moves whole groups, never single streams.
"""
from __future__ import annotations

import zlib

DEFAULT_NUM_GROUPS = 256


def key_group(stream_id: str, num_groups: int = DEFAULT_NUM_GROUPS) -> int:
    return zlib.crc32(stream_id.encode("utf-8")) % num_groups


def group_owner(group: int, world_size: int, num_groups: int = DEFAULT_NUM_GROUPS) -> int:
    return group * world_size // num_groups


def owner(stream_id: str, world_size: int, num_groups: int = DEFAULT_NUM_GROUPS) -> int:
    """The rank that trains this stream."""
    return group_owner(key_group(stream_id, num_groups), world_size, num_groups)
