"""A model's own limits (config.json "limits") lower the service-wide ones, in the gateway and the archive."""
from rnnserve.service.archive import model_config
from rnnserve.service.gateway.registry import LIMITS, model_limits


def test_limits_only_go_down_and_unknown_or_bad_values_are_ignored():
    config = {"task": "translation", "limits": {"max_tokens": 100, "max_text_chars": 10**6, "max_texts": 0,
                                                "max_beam_size": True, "colour": 3}}
    limits = model_limits("translation", config)
    assert limits == {**LIMITS["translation"], "max_tokens": 100}
    assert model_limits("lm", {"task": "lm"}) == LIMITS["lm"]


def test_the_archive_handler_gets_the_models_own_limits():
    handler = model_config("lm", {"task": "lm", "limits": {"max_tokens": 50, "max_prompt_chars": 100}})["handler"]
    assert handler["max_tokens_limit"] == 50 and handler["max_prompt_chars"] == 100
    handler = model_config("translation", {"task": "translation", "limits": {"max_texts": 4}})["handler"]
    assert handler["max_texts"] == 4 and handler["max_text_chars"] == 1000
    assert model_config("lm", {"task": "lm"})["handler"]["max_tokens_limit"] == 2048  # the table is not changed
