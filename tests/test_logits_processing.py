"""OpenAI's presence and frequency penalties and logit_bias, applied on the device (model/sampling.py), through
the real engine on the tiny model, against a reference computed here from transformers' raw logits."""
import pytest
import torch

from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve.engine import Sampling, SequenceRequest
from tests import server_fixtures
from tests.server_fixtures import make_engine, reference_greedy, reference_logits

checkpoint, reference = server_fixtures.checkpoint, server_fixtures.reference


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = make_engine(checkpoint, ParallelState.single(), max_batch=3)
    engine.warm_up()
    engine.start()
    yield engine
    engine.stop()


def penalised_greedy(model, prompt: list[int], new_tokens: int, presence: float, frequency: float,
                     bias: dict[int, float]) -> list[int]:
    """vLLM's meaning: logit + bias - frequency * count - presence * (count > 0), counts over the generated
    tokens only (not the prompt); then the argmax."""
    generated: list[int] = []
    for _ in range(new_tokens):
        logits = reference_logits(model, prompt + generated)[-1].clone()
        for token, value in bias.items():
            logits[token] += value
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.numel()).float()
        logits -= frequency * counts + presence * (counts > 0).float()
        generated.append(int(logits.argmax()))
    return generated


def run(engine, prompt, new_tokens, sampling):
    return engine.submit(SequenceRequest(tuple(prompt), new_tokens, sampling)).result(60).tokens


def test_penalties_count_only_generated_tokens_and_match_the_reference(engine, reference):
    prompt = engine.tokenizer.encode("def encode(self, o):\n    return")
    plain = reference_greedy(reference, prompt, 12)
    assert len(set(plain)) < len(plain)  # plain greedy repeats itself: the penalties have work to do
    cases = [(0.0, 1.5, {}), (1.0, 0.0, {}), (0.4, 0.7, {plain[0]: -5.0, plain[2]: 2.5})]
    futures = [engine.submit(SequenceRequest(tuple(prompt), 12, Sampling(greedy=True, presence_penalty=p,
                                                                         frequency_penalty=f,
                                                                         logit_bias=tuple(sorted(b.items())))))
               for p, f, b in cases]  # one batch: each row its own settings
    for (p, f, b), future in zip(cases, futures):
        expected = penalised_greedy(reference, prompt, 12, p, f, b)
        assert future.result(60).tokens == expected
        assert expected != plain


def test_logit_bias_of_100_forces_its_token_greedy_and_sampled(engine):
    prompt = engine.tokenizer.encode("import re")
    forced = 42
    for sampling in (Sampling(greedy=True), Sampling(temperature=1.0, seed=3)):
        biased = Sampling(**{**sampling.__dict__, "logit_bias": ((forced, 100.0),)})
        assert run(engine, prompt, 6, biased) == [forced] * 6
        assert run(engine, prompt, 6, sampling) != [forced] * 6


def test_a_row_without_processing_is_unchanged_beside_one_with_it(engine, reference):
    prompt = engine.tokenizer.encode("class JSONDecoder(object):")
    plain = engine.submit(SequenceRequest(tuple(prompt), 8, Sampling(greedy=True)))
    penalised = engine.submit(SequenceRequest(tuple(prompt), 8, Sampling(greedy=True, frequency_penalty=2.0)))
    assert plain.result(60).tokens == reference_greedy(reference, prompt, 8)
    assert penalised.result(60).tokens == penalised_greedy(reference, prompt, 8, 0.0, 2.0, {})
