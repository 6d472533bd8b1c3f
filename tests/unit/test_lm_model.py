import math

import pytest
import torch

from rnnserve.models.folder import load_lm, save_lm
from rnnserve.models.lm import LMConfig, RNNLanguageModel, concat_rows, detach_state, select_rows


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_shapes_loss_and_state(cell):
    torch.manual_seed(0)
    m = RNNLanguageModel(LMConfig(vocab_size=11, cell=cell, embed_dim=8, hidden_size=16, num_layers=3,
                                  residual=True)).eval()
    x = torch.randint(0, 11, (4, 7))
    logits, loss, state = m(x, None, x)
    assert logits.shape == (4, 7, 11)
    assert len(state) == 3
    h = state[0][0] if cell == "lstm" else state[0]
    assert h.shape == (1, 4, 16)
    # an untrained model is close to uniform: loss near ln(V)
    assert abs(loss.item() - math.log(11)) < 0.5


def test_state_carries_context_across_calls():
    """Feeding a sequence in two halves with the carried state equals feeding it at once (TBPTT relies on it)."""
    torch.manual_seed(0)
    m = RNNLanguageModel(LMConfig(vocab_size=9, embed_dim=8, hidden_size=16, num_layers=2)).eval()
    x = torch.randint(0, 9, (2, 10))
    whole, _, _ = m(x)
    a, _, s = m(x[:, :6])
    b, _, _ = m(x[:, 6:], detach_state(s))
    torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=1e-5, rtol=1e-5)


def test_row_selection_keeps_each_rows_state():
    torch.manual_seed(0)
    m = RNNLanguageModel(LMConfig(vocab_size=9, embed_dim=8, hidden_size=16)).eval()
    x = torch.randint(0, 9, (3, 5))
    _, _, s = m(x)
    picked = select_rows(s, torch.tensor([2, 0]))
    torch.testing.assert_close(picked[1][0][:, 0], s[1][0][:, 2])
    both = concat_rows(picked, select_rows(s, torch.tensor([1])))
    assert both[0][1].shape == (1, 3, 16)
    torch.testing.assert_close(both[0][1][:, 2], s[0][1][:, 1])


def test_tied_weights_need_equal_sizes():
    with pytest.raises(ValueError, match="tie_weights"):
        LMConfig(vocab_size=5, embed_dim=8, hidden_size=16, tie_weights=True)
    m = RNNLanguageModel(LMConfig(vocab_size=5, embed_dim=16, hidden_size=16, tie_weights=True))
    assert m.head.weight is m.embed.weight


def test_folder_round_trip_in_fp16(tmp_path, tiny_lm):
    folder = save_lm(tmp_path / "m", tiny_lm.model, tiny_lm.tokenizer, meta={"name": "x"})
    back = load_lm(folder)
    assert back.meta["name"] == "x" and back.meta["task"] == "lm"
    x = torch.randint(0, tiny_lm.tokenizer.vocab_size, (1, 12))
    a, _, _ = tiny_lm.model(x)
    b, _, _ = back.model(x)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # both from the same fp16 weights
    assert next(back.model.parameters()).dtype == torch.float32


def test_folder_of_another_task_is_refused(tmp_path, tiny_lm):
    folder = save_lm(tmp_path / "m", tiny_lm.model, tiny_lm.tokenizer)
    cfg = (folder / "config.json").read_text().replace('"task": "lm"', '"task": "translation"')
    (folder / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="not a language model"):
        load_lm(folder)


@pytest.mark.parametrize("cell,residual", [("lstm", False), ("gru", True)])
def test_packed_prefill_equals_each_prompt_alone(cell, residual):
    torch.manual_seed(0)
    m = RNNLanguageModel(LMConfig(vocab_size=9, cell=cell, embed_dim=8, hidden_size=16, num_layers=2,
                                  residual=residual)).eval()
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 1]]
    logits, state = m.prefill(prompts)
    for i, p in enumerate(prompts):
        alone, _, s = m(torch.tensor([p]))
        torch.testing.assert_close(logits[i], alone[0, -1], atol=1e-5, rtol=1e-5)
        for layer in range(2):
            got = state[layer][0][:, i] if cell == "lstm" else state[layer][:, i]
            want = s[layer][0][:, 0] if cell == "lstm" else s[layer][:, 0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
