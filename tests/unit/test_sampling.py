import pytest
import torch

from rnnserve.engine.sampling import (RowSampler, SamplingParams, _pick, sample_rows, uniforms,
                                      uniforms_vectorised)


def _params(B, temperature=1.0, top_k=0, top_p=1.0):
    return (torch.full((B,), float(temperature)), torch.full((B,), top_k, dtype=torch.long),
            torch.full((B,), float(top_p)))


def draws(seeds, position=0):
    seeds = torch.tensor(seeds, dtype=torch.long)
    return seeds, torch.full_like(seeds, position)


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
    out = sample_rows(logits, *_params(2, temperature=0.0), *draws([1, 2]))
    assert out.tolist() == [1, 0]
    mixed = sample_rows(logits, torch.tensor([0.0, 1.0]), *_params(2)[1:], *draws([1, 2]))
    assert mixed[0] == 1


def test_uniforms_are_uniform_and_depend_on_seed_and_position_alone():
    n = 100_000
    u = uniforms(torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert 0 < float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / n
    torch.testing.assert_close(hist, torch.full((10,), 0.1), atol=0.005, rtol=0)
    along = uniforms(torch.full((n,), 2**62 + 12345), torch.arange(n))  # one request's stream
    assert abs(float(along.mean()) - 0.5) < 0.005 and len(set(along.tolist())) > n * 0.99
    assert float(uniforms(torch.tensor([7]), torch.tensor([3]))) == float(
        uniforms(torch.tensor([1, 7, 9]), torch.tensor([0, 3, 3]))[1])


def test_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    assert torch.equal(sample_rows(logits, *_params(5, top_k=1), *draws(range(5))), logits.argmax(-1))
    assert torch.equal(sample_rows(logits, *_params(5, top_p=1e-6), *draws(range(5))), logits.argmax(-1))


def test_top_k_only_samples_among_the_k_best():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(400, 1)
    out = sample_rows(logits, *_params(400, temperature=5.0, top_k=2), *draws(range(400)))
    assert set(out.tolist()) == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().unsqueeze(0).repeat(20000, 1)
    out = sample_rows(logits, *_params(20000), *draws(range(20000)))
    freq = torch.bincount(out, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_a_rows_draw_does_not_depend_on_its_neighbours():
    torch.manual_seed(0)
    row = torch.randn(1, 50)
    alone = sample_rows(row, *_params(1, top_p=0.9), *draws([7], 5))
    others = torch.randn(3, 50)
    batch = torch.cat([others[:2], row, others[2:]])
    mixed = sample_rows(batch, *_params(4, top_p=0.9), torch.tensor([1, 2, 7, 3]), torch.tensor([0, 9, 5, 2]))
    assert mixed[2] == alone[0]


@pytest.mark.parametrize("field,value,message", [
    ("max_tokens", 0, "max_tokens"), ("temperature", float("nan"), "temperature"), ("temperature", 9.0, "temperature"),
    ("top_p", 0.0, "top_p"), ("top_k", -1, "top_k"), ("stop", [""], "stop"), ("seed", -5, "seed"),
])
def test_invalid_params_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value}).validate()


def test_max_tokens_limit():
    with pytest.raises(ValueError, match="at most 10"):
        SamplingParams(max_tokens=11).validate(max_tokens_limit=10)


def test_the_device_path_equals_the_cpu_path():
    """A GPU draws with torch ops, the CPU with numpy: a seeded request gives the same text on both."""
    seeds = torch.tensor([0, 1, 7, 2**62 + 12345, 2**63 - 1] + list(range(1000, 1100)))
    positions = torch.tensor([0, 5, 100, 2**40, 7] + list(range(100)))
    assert torch.equal(uniforms(seeds, positions), uniforms_vectorised(seeds, positions))
    grid = positions.unsqueeze(1) + torch.arange(16)  # a step's draws at once: (B, tokens)
    assert torch.equal(uniforms(seeds.unsqueeze(1), grid), uniforms_vectorised(seeds.unsqueeze(1), grid))
    assert torch.equal(uniforms(seeds.unsqueeze(1), grid)[:, 3], uniforms(seeds, positions + 3))


def test_the_draws_are_pinned():
    """Every seeded text depends on these numbers: a change to the hash changes them all."""
    u = uniforms(torch.tensor([0, 1, 7, 2**62 + 12345, 2**63 - 1]), torch.tensor([0, 5, 100, 2**40, 7]))
    assert [x.hex() for x in u.tolist()] == ["0x1.90bcc38200000p-2", "0x1.4d557e4c00000p-3", "0x1.976afb0400000p-3",
                                             "0x1.75cc36c200000p-2", "0x1.463ee51000000p-5"]


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "uniform", "nan", "peaked"])
def test_the_cpu_pick_equals_the_torch_pick(kind):
    """The CPU samples through numpy (RowSampler._pick_cpu), a GPU through torch (_pick): the same token for every
    row, including rows with equal probabilities (torch.sort orders them its own way) and NaN."""
    g = torch.Generator().manual_seed(len(kind))
    for trial in range(40):
        B, V = int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(2, 120, (1,), generator=g))
        logits = torch.randn(B, V, generator=g) * float(torch.rand(1, generator=g) * 20)
        if kind == "ties":
            logits = torch.randint(0, 3, (B, V), generator=g).float()
        elif kind == "zeros":  # probabilities that underflow to 0, equal to each other
            logits[:, ::2] = -1e30
        elif kind == "uniform":
            logits = torch.zeros(B, V)
        elif kind == "nan":
            logits[::3, 0] = float("nan")
        elif kind == "peaked":
            logits = logits * 1000
        temperature = torch.randint(1, 6, (B,), generator=g).float() * 0.4
        top_k = torch.randint(0, V + 3, (B,), generator=g) * (torch.rand(B, generator=g) < 0.4)
        top_p = torch.where(torch.rand(B, generator=g) < 0.4, torch.rand(B, generator=g).clamp(min=1e-6),
                            torch.ones(B))
        u = uniforms(torch.randint(0, 2**62, (B,), generator=g), torch.randint(0, 5000, (B,), generator=g))
        u[0] = 1 - 2**-33  # the largest draw: rounds to 1.0 in float32, the last token kept
        probs = torch.softmax(logits / temperature.unsqueeze(1), -1)
        sampler = RowSampler(temperature, top_k, top_p)
        assert torch.equal(sampler._pick_cpu(probs, u), _pick(probs, top_k, top_p, u)), (kind, trial)


def test_a_batch_of_1024_rows_samples_each_row_as_alone():
    # the GPU profile's batch (service/archive.py): mixed greedy, top-k, top-p and plain rows
    torch.manual_seed(0)
    B, V = 1024, 65
    logits = torch.randn(B, V) * 3
    temperature = torch.where(torch.arange(B) % 4 == 0, 0.0, 0.8)
    top_k = torch.where(torch.arange(B) % 4 == 1, 5, 0)
    top_p = torch.where(torch.arange(B) % 4 == 2, 0.9, 1.0)
    seeds, positions = torch.arange(B) * 7919, torch.arange(B) % 300
    tokens = sample_rows(logits, temperature, top_k, top_p, seeds, positions)
    assert tokens.shape == (B,) and tokens.dtype == torch.long
    assert torch.equal(tokens[::4], logits[::4].argmax(-1))
    for i in (0, 1, 2, 3, 511, 1021, 1022, 1023):
        one = slice(i, i + 1)
        alone = sample_rows(logits[one], temperature[one], top_k[one], top_p[one], seeds[one], positions[one])
        assert alone[0] == tokens[i]
