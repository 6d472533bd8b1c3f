import json

from rnnserve.engine.lm_engine import StepOutput
from rnnserve.service.handlers.frames import output_frame


def test_a_progress_frame_is_the_json_of_its_text_and_batch_whatever_the_text():
    for text in ["", "plain", 'quote " and \\\\ backslash', "line\nbreak\ttab\x01", "ünïcödé ✓ 😀", "\u2028"]:
        o = StepOutput("r", text, batch_size=7)
        assert output_frame(o) == json.dumps({"text": text, "batch": 7}, ensure_ascii=False) + "\n"


def test_a_last_frame_carries_its_ending():
    o = StepOutput("r", "end", True, "stop", batch_size=2, prompt_tokens=3, completion_tokens=4)
    assert json.loads(output_frame(o)) == {"text": "end", "batch": 2, "finish_reason": "stop",
                                           "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
