"""Device placement: cuda:{gpu_id} from TorchServe's context with optional fp16, CPU otherwise."""
import pytest
import torch

from rnnserve.service.handlers.frames import pick_device
from rnnserve.service.handlers.lm_handler import LanguageModelHandler
from rnnserve.service.handlers.translation_handler import TranslationHandler
from tests.unit.fakes import FakeContext, Frontend

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_fallback_is_fp32_whatever_is_asked():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_device(None, True) == (torch.device("cpu"), torch.float32)
    assert pick_device(0, True) == (torch.device("cpu"), torch.float32)


@gpu
def test_gpu_id_and_half_precision():
    last = torch.cuda.device_count() - 1
    assert pick_device(last, True) == (torch.device(f"cuda:{last}"), torch.float16)
    assert pick_device(0, False) == (torch.device("cuda:0"), torch.float32)


@gpu
def test_handlers_generate_on_the_gpu_in_half_precision(tiny_lm_folder, tiny_translation_folder):
    ctx = FakeContext(tiny_lm_folder, {"half_precision": True})
    ctx.system_properties["gpu_id"] = 0
    h = LanguageModelHandler()
    h.initialize(ctx)
    assert next(h.engine.model.parameters()).dtype == torch.float16
    fe = Frontend(h, ctx)
    fe.submit("a", {"prompt": "ROMEO:", "max_tokens": 20, "seed": 1})
    fe.drain()
    assert fe.frames["a"][-1]["usage"]["completion_tokens"] == 20
    ctx = FakeContext(tiny_translation_folder, {"half_precision": True})
    ctx.system_properties["gpu_id"] = 0
    t = TranslationHandler()
    t.initialize(ctx)
    fe = Frontend(t, ctx)
    fe.submit("b", {"texts": ["ein mann ."], "beam_size": 4, "max_tokens": 5})
    fe.drain()
    assert len(fe.frames["b"][-1]["translations"][0]["tokens"]) == 5
