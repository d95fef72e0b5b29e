"""The Generator's step contract on one process (model/generate.py, ParallelState.single)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fleetgen.model.generate import greedy_plan
from fleetgen.model.load import build_generator
from fleetgen.model.parallel import ParallelState
from fleetgen.model.sampling import apply_repetition_penalty, history_mask
from tests import hf_reference as ref
from tests.hf_reference import padded_batch, step_plan

INF = float("-inf")


# ---- sampling, pure functions


# ---- the Generator on one process


def test_different_length_batch_equals_each_prompt_alone(generator):
    together = generator.generate_greedy(ref.PROMPTS, 12)
    alone = [generator.generate_greedy([p], 12)[0] for p in ref.PROMPTS]
    assert together == alone


def test_decode_rows_at_different_positions_in_non_contiguous_slots(generator):
    want = {i: generator.generate_greedy([p], 6)[0] for i, p in enumerate(ref.PROMPTS[:2])}
    long, short = ref.PROMPTS[0], ref.PROMPTS[1]
    first = generator.step(step_plan("prefill", [3], torch.tensor([long]), [len(long)])).tokens
    got = {0: [int(first)]}
    for i in range(2):  # slot 3 runs ahead alone
        step = step_plan("decode", [3], torch.tensor([[got[0][-1]]]), [len(long) + i])
        got[0].append(int(generator.step(step).tokens))
    got[1] = [int(generator.step(step_plan("prefill", [1], torch.tensor([short]), [len(short)])).tokens)]
    for i in range(3):  # then both together, at positions 5 + 2 + i and 3 + i
        tokens = torch.tensor([[got[0][-1]], [got[1][-1]]])
        out = generator.step(step_plan("decode", [3, 1], tokens, [len(long) + 2 + i, len(short) + i])).tokens
        got[0].append(int(out[0]))
        got[1].append(int(out[1]))
    assert got[0][:6] == want[0][:6] and got[1][:4] == want[1][:4]


def test_logprobs_follow_the_raw_logits(generator, gpt2):
    tokens, lengths = padded_batch(ref.PROMPTS)
    tokens[torch.arange(tokens.shape[1]) >= lengths[:, None]] = -1  # a pad id outside the vocabulary is fine
    plan = step_plan("prefill", [0, 1, 2], tokens, lengths.tolist(), logprobs=True, full_logprobs=True,
                 temperature=[0.5] * 3, top_k=[3] * 3, greedy=[False] * 3, seed=[1] * 3)
    out = generator.step(plan)
    want = [logits.log_softmax(-1) for logits in ref.reference_logits(gpt2[0])]
    assert out.full_logprobs.shape == (3, tokens.shape[1], ref.VOCAB)
    assert out.prompt_logprobs.shape == (3, tokens.shape[1] - 1)
    for row, lsm in enumerate(want):
        n = len(ref.PROMPTS[row])
        expected = lsm[:-1].gather(1, torch.tensor(ref.PROMPTS[row][1:])[:, None]).squeeze(1)
        assert torch.allclose(out.prompt_logprobs[row, :n - 1], expected, atol=1e-4)
        assert (out.prompt_logprobs[row, n - 1:] == 0).all()
        assert torch.allclose(out.logprobs[row], lsm[-1, out.tokens[row]], atol=1e-4)
        assert torch.allclose(out.full_logprobs[row, :n], lsm, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(generator):
    def run(slots, seeds, prompts):
        tokens, lengths = padded_batch(prompts)
        sampling = dict(greedy=[False] * len(slots), temperature=[1.5] * len(slots), seed=seeds)
        out = [generator.step(step_plan("prefill", slots, tokens, lengths.tolist(), **sampling)).tokens]
        for i in range(5):
            out.append(generator.step(step_plan("decode", slots, out[-1][:, None], (lengths + i).tolist(),
                                            **sampling)).tokens)
        return torch.stack(out, dim=1).tolist()

    alone = run([0], [1234], ref.PROMPTS[:1])
    with_neighbours = run([2, 0, 1], [99, 1234, -1], [ref.PROMPTS[1], ref.PROMPTS[0], ref.PROMPTS[2]])
    assert with_neighbours[1] == alone[0]
    assert run([0], [1234], ref.PROMPTS[:1]) == alone


def test_repetition_penalty_covers_prompt_and_fed_tokens(generator, gpt2):
    prompt = ref.PROMPTS[2]
    generator.step(step_plan("prefill", [0], torch.tensor([prompt]), [len(prompt)]))
    fed = 146  # after it the plain argmax is 11, a prompt token: the penalty must change the choice
    decode = step_plan("decode", [0], torch.tensor([[fed]]), [len(prompt)], greedy=[False], top_k=[1],
                       repetition_penalty=[50.0])
    out = generator.step(decode)
    seen = torch.zeros(ref.VOCAB, dtype=torch.bool)
    seen[prompt + [fed]] = True
    assert history_mask(generator.history[[0]], generator.history_len[[0]], ref.VOCAB)[0].equal(seen)
    logits = ref.reference_logits(gpt2[0], [prompt + [fed]])[0][-1:]  # [1, vocab] at the fed token
    expected = apply_repetition_penalty(logits, torch.tensor([50.0]), seen[None]).argmax()
    assert int(logits.argmax()) == 11 and int(expected) != 11
    assert int(out.tokens[0]) == int(expected)


def test_ban_eos_never_picks_the_eos_token(gpt2):
    source = ref.open_source(gpt2[1])
    prompt = ref.PROMPTS[0]
    generator = build_generator(source, ParallelState.single(), "fp32", 2, 16)
    favourite = generator.generate_greedy([prompt], 1)[0][0]
    source.config = replace(source.config, eos_id=favourite)
    generator = build_generator(source, ParallelState.single(), "fp32", 2, 16)
    banned = generator.step(step_plan("prefill", [0], torch.tensor([prompt]), [len(prompt)], ban_eos=[True]))
    free = generator.step(step_plan("prefill", [0], torch.tensor([prompt]), [len(prompt)]))
    assert int(free.tokens[0]) == favourite and int(banned.tokens[0]) != favourite


@pytest.mark.parametrize("change, message", [
    (dict(slots=[4]), "slots"),
    (dict(slots=[1, 1]), "slots"),
    (dict(tokens=[[1, 2]], kind="decode"), "tokens"),
    (dict(lengths=[9]), "lengths"),
    (dict(tokens=[[1, 250, 3]]), "ids must be in"),
    (dict(greedy=[False], temperature=[0.0]), "temperature"),
    (dict(kind="score"), "kind"),
])
def test_bad_plans_are_refused_with_the_field_named(generator, change, message):
    fields = dict(kind="prefill", slots=[0], tokens=[[1, 2, 3]], lengths=[3])
    fields.update({k: v for k, v in change.items() if k in fields})
    extra = {k: v for k, v in change.items() if k not in fields}
    n = len(fields["slots"])
    plan = greedy_plan(fields["kind"], torch.tensor(fields["slots"]), torch.tensor(fields["tokens"]),
                       torch.tensor(fields["lengths"] * (n if len(fields["lengths"]) == 1 else 1)))
    for name, value in extra.items():
        setattr(plan, name, torch.tensor(value, dtype=getattr(plan, name).dtype))
    with pytest.raises(ValueError, match=message):
        generator.step(plan)


def test_generate_greedy_refuses_what_the_cache_cannot_hold(generator):
    assert generator.generate_greedy([list(range(1, 40))], 10) != []  # 39 + 10 - 1 = 48 positions fit
    with pytest.raises(ValueError, match="a 39-token prompt \\+ 11 new tokens exceed max_seq_len=48"):
        generator.generate_greedy([list(range(1, 40))], 11)
    assert generator.generate_greedy(ref.PROMPTS, 0) == [[], [], []]
