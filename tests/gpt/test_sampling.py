"""Properties of next-token choice: filters, penalties, seeds."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from gpt.sampling import RowState, SamplingParams, apply_penalties, filter_logits, sample


def _rows(n, **kw):
    return [RowState.new(SamplingParams(seed=i, **kw), [1, 2]) for i in range(n)]


def _draws(logits, n=3000, **kw):
    return sample(logits.expand(n, -1), _rows(n, **kw))


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(5).indices.tolist())
    got = set(_draws(logits, top_k=5).tolist())
    assert got <= allowed
    assert len(got) == 5  # and it does sample all of them


def test_top_p_samples_only_from_the_smallest_set_reaching_p():
    logits = torch.randn(1, 50) * 2
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    n_needed = int((cum < 0.8).sum()) + 1  # smallest prefix whose mass reaches 0.8
    nucleus = set(order[:n_needed].tolist())
    got = set(_draws(logits, top_p=0.8).tolist())
    assert got <= nucleus
    assert got == nucleus


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    got = set(_draws(logits, min_p=0.2).tolist())  # threshold 0.1: the 0.05 token goes
    assert got == {0, 1, 2}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = _draws(probs.log()[None], n=6000)
    freq = torch.bincount(draws, minlength=3).float() / 6000
    assert torch.allclose(freq, probs, atol=0.03)


def test_temperature_zero_and_top_k_one_both_equal_greedy():
    logits = torch.randn(64, 300)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, _rows(64, temperature=0.0)), greedy)
    assert torch.equal(sample(logits, _rows(64, temperature=1.3, top_k=1)), greedy)


def test_low_temperature_sharpens_towards_greedy():
    logits = torch.randn(1, 30)
    hot = _draws(logits, temperature=5.0)
    cold = _draws(logits, temperature=0.05)
    top = int(logits.argmax())
    assert (cold == top).float().mean() > 0.95 > (hot == top).float().mean()


def test_same_seed_reproduces_and_a_different_seed_differs():
    logits = torch.randn(1, 1000)

    def run(seed):
        row = RowState.new(SamplingParams(seed=seed), [0])
        return [int(sample(logits, [row])) for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_seeded_row_samples_the_same_whatever_shares_its_batch():
    logits = torch.randn(5, 400)
    alone = [
        int(sample(logits[2:3], [RowState.new(SamplingParams(seed=11, top_p=0.9), [0])])) for _ in range(1)
    ]
    others = [RowState.new(SamplingParams(seed=s, temperature=0.7), [0]) for s in (1, 2)]
    me = RowState.new(SamplingParams(seed=11, top_p=0.9), [0])
    batch = sample(
        logits,
        others[:1]
        + [RowState.new(SamplingParams(temperature=0), [0])]
        + [me]
        + others[1:]
        + [RowState.new(SamplingParams(top_k=3), [0])],
    )
    assert int(batch[2]) == alone[0]


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 40)
    history = [3, 5, 5, 9, 30]
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([history]), logits.clone())
    ours = apply_penalties(
        logits[0].clone(),
        RowState(SamplingParams(repetition_penalty=1.7), history[:2], output_ids=history[2:]),
    )
    assert torch.allclose(ours, ref[0])


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(10)
    row = RowState(
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 1, 1], output_ids=[4, 4, 4, 7]
    )
    out = apply_penalties(logits, row)
    assert out[4] == pytest.approx(-(0.5 + 3 * 0.25))
    assert out[7] == pytest.approx(-(0.5 + 0.25))
    assert out[1] == 0  # the prompt is not penalised


def test_logit_bias_can_force_and_ban_tokens():
    logits = torch.randn(200, 50)
    forced = sample(logits, _rows(200, logit_bias={17: 100.0}))
    assert (forced == 17).all()
    top = logits.argmax(-1)
    banned = sample(
        logits, [RowState.new(SamplingParams(temperature=0, logit_bias={int(t): -100.0}), [0]) for t in top]
    )
    assert (banned != top).all()


def test_filters_keep_at_least_the_most_likely_token():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    out = filter_logits(logits, torch.tensor([0]), torch.tensor([1e-9]), torch.tensor([1.0]))
    assert torch.isfinite(out[0, 0]) and torch.isinf(out[0, 1:]).all()


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=2),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(max_new_tokens=-1),
        dict(max_new_tokens=0, num_beams=2),  # 0 reads the prompt only: nothing to search
        dict(num_beams=0),
        dict(logit_bias={5: 500}),
        dict(logprobs=50),
    ],
)
def test_out_of_range_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
