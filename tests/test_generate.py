"""Sampling functions on their own, and the Generator's step contract on one process (ParallelState.single)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetgen.model.generate import Generator, StepPlan, greedy_plan
from fleetgen.model.load import build_generator, load_stage, startup_report
from fleetgen.model.parallel import ParallelState
from fleetgen.model.sampling import (apply_repetition_penalty, apply_top_k, apply_top_p, ban_tokens,
                                     history_mask, multinomial, sample)
from tests import hf_reference as ref
from tests.test_parity import padded_batch

INF = float("-inf")


def _plan(kind, slots, tokens, lengths, **changes) -> StepPlan:
    plan = greedy_plan(kind, torch.tensor(slots), tokens, torch.tensor(lengths))
    n = len(slots)
    for name, value in changes.items():
        if name in ("logprobs", "full_logprobs", "return_logits"):
            setattr(plan, name, value)
        else:
            dtype = getattr(plan, name).dtype
            setattr(plan, name, torch.tensor(value, dtype=dtype).expand(n).clone())
    return plan


# ---- sampling, pure functions


def test_top_k_keeps_the_k_largest_per_row_and_zero_is_off():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, 0]))
    assert out[0].tolist() == [INF, 4.0, 3.0, INF]
    assert out[1].tolist() == logits[1].tolist()


def test_top_p_keeps_the_first_token_crossing_p():
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(4, 3)
    out = apply_top_p(logits, torch.tensor([0.4, 0.6, 0.0, 1.0]))
    kept = (out > INF).tolist()
    assert kept[0] == [True, False, False]  # 0.5 already crosses 0.4
    assert kept[1] == [True, True, False]   # 0.5 < 0.6, 0.8 crosses: kept
    assert kept[2] == kept[3] == [True, True, True]  # 0 and 1 are off


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
    probs = torch.full((3, 50), 1 / 50)
    alone = multinomial(probs[:1], [torch.Generator().manual_seed(7)])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(7), None]
    together = multinomial(probs, gens)
    assert together[1] == alone[0]
    again = multinomial(probs[:1], [torch.Generator().manual_seed(7)])
    assert again.tolist() == alone.tolist()


def test_sampling_respects_top_k_and_temperature():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0]]).expand(200, 4)
    n = logits.shape[0]
    tokens = sample(logits, greedy=torch.zeros(n, dtype=torch.bool), temperature=torch.full((n,), 10.0),
                    top_k=torch.full((n,), 2), top_p=torch.zeros(n), repetition_penalty=torch.ones(n),
                    seen=None, generators=[torch.Generator().manual_seed(i) for i in range(n)])
    assert set(tokens.tolist()) == {0, 1}  # both survive, nothing past the top 2


# ---- the Generator on one process


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    model = ref.build("gpt2")
    directory = ref.save(model, tmp_path_factory.mktemp("gpt2"))
    return model, directory


@pytest.fixture()
def generator(gpt2) -> Generator:
    torch.manual_seed(0)
    return build_generator(ref.open_source(gpt2[1]), ParallelState.single(), "fp32", max_batch=4,
                           max_seq_len=48)


def test_different_length_batch_equals_each_prompt_alone(generator):
    together = generator.generate_greedy(ref.PROMPTS, 12)
    alone = [generator.generate_greedy([p], 12)[0] for p in ref.PROMPTS]
    assert together == alone


def test_decode_rows_at_different_positions_in_non_contiguous_slots(generator):
    want = {i: generator.generate_greedy([p], 6)[0] for i, p in enumerate(ref.PROMPTS[:2])}
    long, short = ref.PROMPTS[0], ref.PROMPTS[1]
    first = generator.step(_plan("prefill", [3], torch.tensor([long]), [len(long)])).tokens
    got = {0: [int(first)]}
    for i in range(2):  # slot 3 runs ahead alone
        got[0].append(int(generator.step(_plan("decode", [3], torch.tensor([[got[0][-1]]]), [len(long) + i])).tokens))
    got[1] = [int(generator.step(_plan("prefill", [1], torch.tensor([short]), [len(short)])).tokens)]
    for i in range(3):  # then both together, at positions 5 + 2 + i and 3 + i
        tokens = torch.tensor([[got[0][-1]], [got[1][-1]]])
        out = generator.step(_plan("decode", [3, 1], tokens, [len(long) + 2 + i, len(short) + i])).tokens
        got[0].append(int(out[0]))
        got[1].append(int(out[1]))
    assert got[0][:6] == want[0][:6] and got[1][:4] == want[1][:4]


def test_logprobs_follow_the_raw_logits(generator, gpt2):
    tokens, lengths = padded_batch(ref.PROMPTS)
    tokens[torch.arange(tokens.shape[1]) >= lengths[:, None]] = -1  # a pad id outside the vocabulary is fine
    plan = _plan("prefill", [0, 1, 2], tokens, lengths.tolist(), logprobs=True, full_logprobs=True,
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
        out = [generator.step(_plan("prefill", slots, tokens, lengths.tolist(), **sampling)).tokens]
        for i in range(5):
            out.append(generator.step(_plan("decode", slots, out[-1][:, None], (lengths + i).tolist(),
                                            **sampling)).tokens)
        return torch.stack(out, dim=1).tolist()

    alone = run([0], [1234], ref.PROMPTS[:1])
    with_neighbours = run([2, 0, 1], [99, 1234, -1], [ref.PROMPTS[1], ref.PROMPTS[0], ref.PROMPTS[2]])
    assert with_neighbours[1] == alone[0]
    assert run([0], [1234], ref.PROMPTS[:1]) == alone


def test_repetition_penalty_covers_prompt_and_fed_tokens(generator):
    prompt = ref.PROMPTS[2]
    fed = int(generator.step(_plan("prefill", [0], torch.tensor([prompt]), [len(prompt)])).tokens[0])
    decode = _plan("decode", [0], torch.tensor([[fed]]), [len(prompt)], return_logits=True, greedy=[False],
                   top_k=[1], repetition_penalty=[50.0])
    out = generator.step(decode)
    seen = torch.zeros(ref.VOCAB, dtype=torch.bool)
    seen[prompt + [fed]] = True
    assert history_mask(generator.history[[0]], generator.history_len[[0]], ref.VOCAB)[0].equal(seen)
    expected = apply_repetition_penalty(out.logits[:, 0], torch.tensor([50.0]), seen[None]).argmax()
    assert int(out.tokens[0]) == int(expected)


def test_ban_eos_never_picks_the_eos_token(gpt2):
    source = ref.open_source(gpt2[1])
    prompt = ref.PROMPTS[0]
    generator = build_generator(source, ParallelState.single(), "fp32", 2, 16)
    favourite = generator.generate_greedy([prompt], 1)[0][0]
    source.config = source.config.with_overrides(eos_id=favourite)
    generator = build_generator(source, ParallelState.single(), "fp32", 2, 16)
    banned = generator.step(_plan("prefill", [0], torch.tensor([prompt]), [len(prompt)], ban_eos=[True]))
    free = generator.step(_plan("prefill", [0], torch.tensor([prompt]), [len(prompt)]))
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


@pytest.mark.parametrize("precision, tolerance", [("fp16", 0.1), ("bf16", 0.6)])
def test_half_precisions_stay_close_to_fp32(gpt2, precision, tolerance):
    tokens, lengths = padded_batch(ref.PROMPTS)
    logits = {}
    for p in ("fp32", precision):
        stage = load_stage(ref.open_source(gpt2[1]), ParallelState.single(), p)
        assert {t.dtype for t in stage.parameters()} == {torch.float16 if p == "fp16" else
                                                          torch.bfloat16 if p == "bf16" else torch.float32}
        plan = _plan("prefill", [0, 1, 2], tokens, lengths.tolist(), return_logits=True)
        logits[p] = Generator(stage, ParallelState.single(), 4, 16).step(plan).logits
    assert logits[precision].dtype == torch.float32
    assert (logits[precision] - logits["fp32"]).abs().max() < tolerance


def test_startup_report_names_the_shard(generator):
    line = startup_report(generator)
    assert "\n" not in line
    for part in ("gpt2", "2 layers", "hidden 64", "vocab 250 (padded 256)", "layers 0-1", "float32",
                 "layer norm torch", "KV cache"):
        assert part in line, f"{part!r} missing from {line!r}"
    # 2 (k, v) × 2 layers × 4 slots × (48 positions + 1 scratch) × 4 heads × 16 dims × 4 bytes
    assert generator.cache.bytes == 2 * 2 * 4 * (48 + 1) * 4 * 16 * 4


def test_learned_positions_bound_max_seq_len(gpt2):
    with pytest.raises(ValueError, match="max_seq_len=65 exceeds the model's 64 learned positions"):
        build_generator(ref.open_source(gpt2[1]), ParallelState.single(), "fp32", 1, 65)


def test_unknown_precision_is_refused(gpt2):
    with pytest.raises(ValueError, match="precision='fp8'"):
        load_stage(ref.open_source(gpt2[1]), ParallelState.single(), "fp8")


def test_generate_greedy_refuses_what_the_cache_cannot_hold(generator):
    assert generator.generate_greedy([list(range(1, 40))], 10) != []  # 39 + 10 - 1 = 48 positions fit
    with pytest.raises(ValueError, match="a 39-token prompt \\+ 11 new tokens exceed max_seq_len=48"):
        generator.generate_greedy([list(range(1, 40))], 11)
    assert generator.generate_greedy(ref.PROMPTS, 0) == [[], [], []]
