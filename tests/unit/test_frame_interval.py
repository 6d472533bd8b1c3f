from rnnserve.service.archive import MODEL_CONFIGS
from rnnserve.service.handlers.frame_interval import frame_interval


def test_the_frame_interval_grows_with_the_streams_between_its_floor_and_its_most():
    # 60 ms floor, 4 ms per stream, at most 250 ms
    assert [frame_interval(0.06, 0.004, 0.25, n) for n in (1, 15, 16, 32, 62, 63, 64, 1024)] == \
        [0.06, 0.06, 0.064, 0.128, 0.248, 0.25, 0.25, 0.25]


def test_the_archives_defaults_hold_frames_96_ms_apart_at_32_streams_and_192_at_64():
    handler = MODEL_CONFIGS["lm"]["handler"]
    interval = [frame_interval(handler["frame_interval_ms"] / 1000, handler["frame_interval_per_stream_ms"] / 1000,
                               handler["max_frame_interval_ms"] / 1000, n) for n in (1, 20, 32, 64, 84, 1024)]
    assert [round(x, 3) for x in interval] == [0.06, 0.06, 0.096, 0.192, 0.25, 0.25]


def test_a_floor_of_zero_sends_a_frame_per_step_whatever_the_streams():
    assert frame_interval(0.0, 0.004, 0.25, 1024) == 0.0


def test_no_growth_without_a_per_stream_share_or_a_most():
    assert frame_interval(0.06, 0.0, 0.25, 1024) == 0.06
    assert frame_interval(0.06, 0.004, 0.0, 1024) == 0.06
    # a most below the floor leaves the floor
    assert frame_interval(0.3, 0.004, 0.25, 1024) == 0.3
