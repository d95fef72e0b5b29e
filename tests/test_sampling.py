"""Sampling functions on their own (model/sampling.py)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetgen.model.sampling import (apply_repetition_penalty, apply_top_k, apply_top_p, ban_tokens, history_mask,
                                     multinomial, sample)

INF = float("-inf")


def test_top_k_keeps_the_k_largest_per_row_and_zero_is_off():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, 0]))
    assert out[0].tolist() == [INF, 4.0, 3.0, INF]
    assert out[1].tolist() == logits[1].tolist()


def test_top_k_of_one_keeps_only_the_largest_and_k_is_bounded_by_the_vocabulary():
    out = apply_top_k(torch.tensor([[1.0, 4.0, 3.0]]), torch.tensor([1]))
    assert out.tolist() == [[INF, 4.0, INF]]
    out = apply_top_k(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), torch.tensor([3]))  # one row, k past it: 3 kept
    assert out.tolist() == [[INF, 4.0, 3.0, 2.0]]


def test_a_high_temperature_flattens_the_distribution():
    n = 200
    tokens = sample(torch.tensor([[1.0, 0.0]]).expand(n, 2), greedy=torch.zeros(n, dtype=torch.bool),
                    temperature=torch.full((n,), 100.0), top_k=torch.zeros(n, dtype=torch.long),
                    top_p=torch.zeros(n), repetition_penalty=torch.ones(n), seen=None,
                    generators=[torch.Generator().manual_seed(i) for i in range(n)])
    assert 60 < tokens.sum() < 140  # near 50/50 (multiplied by 100 instead, token 1 would never come)


def test_sampled_rows_get_their_own_repetition_penalty():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    seen = torch.tensor([[False, False, False], [True, False, False]])
    tokens = sample(logits, greedy=torch.tensor([True, False]), temperature=torch.ones(2),
                    top_k=torch.ones(2, dtype=torch.long), top_p=torch.zeros(2),
                    repetition_penalty=torch.tensor([1.0, 2.0]), seen=seen, generators=[None, None])
    assert tokens.tolist() == [0, 1]  # row 1's seen 3.0 becomes 1.5, below 2.0


def test_top_p_keeps_the_first_token_crossing_p():
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(4, 3)
    out = apply_top_p(logits, torch.tensor([0.4, 0.6, 0.0, 1.0]))
    kept = (out > INF).tolist()
    assert kept[0] == [True, False, False]  # 0.5 already crosses 0.4
    assert kept[1] == [True, True, False]   # 0.5 < 0.6, 0.8 crosses: kept
    assert kept[2] == kept[3] == [True, True, True]  # 0 and 1 are off



def test_top_p_keeps_a_token_whose_mass_above_equals_p_as_nemo_does():
    out = apply_top_p(torch.zeros(1, 4), torch.tensor([0.5]))  # 0.25 each: 0.5 lies above the third, exactly
    assert (out > INF).tolist() == [[True, True, True, False]]


def test_top_p_of_one_keeps_every_token_even_past_a_rounding_of_the_mass_above_one():
    logits = -torch.arange(18.0)[None]  # float32: the mass ranked above the last token sums to just over 1
    probs = logits.softmax(dim=1)
    assert (probs.cumsum(dim=1) - probs)[0, -1] > 1
    assert (apply_top_p(logits, torch.tensor([1.0])) == logits).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=12), st.integers(0, 12), st.floats(0, 1))
def test_top_k_then_top_p_always_keeps_the_argmax(values, k, p):
    logits = torch.tensor([values])
    out = apply_top_p(apply_top_k(logits, torch.tensor([k])), torch.tensor([p]))
    assert out[0, logits.argmax()] == logits.max()
    kept = out[0] > INF
    assert (logits[0][kept].min() >= logits[0][~kept].max()) if (~kept).any() else kept.all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    history = torch.tensor([[0, 2, 9, 9], [1, 1, 1, 1]])
    seen = history_mask(history, torch.tensor([2, 1]), vocab=4)
    assert seen.tolist() == [[True, False, True, False], [False, True, False, False]]
    logits = torch.tensor([[2.0, 2.0, -2.0, 1.0], [2.0, 2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([2.0, 1.0]), seen)
    assert out[0].tolist() == [1.0, 2.0, -4.0, 1.0]
    assert out[1].tolist() == logits[1].tolist()
    near_zero = apply_repetition_penalty(torch.tensor([[0.5, -0.5]]), torch.tensor([2.0]), torch.ones(1, 2, dtype=bool))
    assert near_zero.tolist() == [[0.25, -1.0]]  # the sign decides, not a threshold


def test_ban_tokens_only_touches_banned_rows():
    out = ban_tokens(torch.zeros(2, 3), torch.tensor([True, False]), 1)
    assert out.tolist() == [[0.0, INF, 0.0], [0.0, 0.0, 0.0]]


def test_greedy_rows_take_the_argmax_whatever_the_sampling_settings():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    tokens = sample(logits, greedy=torch.tensor([True, True]), temperature=torch.tensor([5.0, 0.1]),
                    top_k=torch.tensor([0, 3]), top_p=torch.tensor([0.9, 0.0]),
                    repetition_penalty=torch.ones(2), seen=None, generators=[None, None])
    assert tokens.tolist() == [1, 1]


def test_seeded_draws_do_not_depend_on_batch_neighbours():
    probs = torch.full((5, 50), 1 / 50)
    probs[2:] = torch.nn.functional.one_hot(torch.tensor([33, 44, 22]), 50)  # those without a generator draw too
    alone = multinomial(probs[:1], [torch.Generator().manual_seed(7)])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(7), None, None, torch.Generator()]
    together = multinomial(probs, gens)
    assert together[1] == alone[0] and together[2:].tolist() == [33, 44, 22]
    again = multinomial(probs[:1], [torch.Generator().manual_seed(7)])
    assert again.tolist() == alone.tolist()


def test_sampling_respects_top_k_and_temperature():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0]]).expand(200, 4)
    n = logits.shape[0]
    tokens = sample(logits, greedy=torch.zeros(n, dtype=torch.bool), temperature=torch.full((n,), 10.0),
                    top_k=torch.full((n,), 2), top_p=torch.zeros(n), repetition_penalty=torch.ones(n),
                    seen=None, generators=[torch.Generator().manual_seed(i) for i in range(n)])
    assert set(tokens.tolist()) == {0, 1}  # both survive, nothing past the top 2
