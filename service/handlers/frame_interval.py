"""How long a stream's frames are held apart: the frame interval, grown with the number of streams.

Every frame costs TorchServe's frontend, the gateway and the client about the same CPU whatever it carries
(BENCHMARKS.md, "The serving path alone"), so the service's cost grows with the frames of all its streams
together. Past `floor_s / per_stream_s` streams the interval grows with them, so that all streams together
send about 1 / per_stream_s frames a second, up to `most_s` between two frames of one stream.
"""
from __future__ import annotations


def frame_interval(floor_s: float, per_stream_s: float, most_s: float, streams: int) -> float:
    """The least time between two frames of a stream, with `streams` in flight. A floor of 0 turns frame intervals
    off (one frame per engine step) whatever the rest; a `most_s` below the floor leaves the floor."""
    if floor_s <= 0:
        return 0.0
    return max(floor_s, min(most_s, per_stream_s * streams))
