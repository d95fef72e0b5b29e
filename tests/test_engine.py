"""The leader's scheduler over the real tiny model, and the broadcast protocol over real processes."""
from concurrent.futures import wait

import pytest
import torch

from fleetgen.model.serve.engine import EngineUnavailable, Sampling, SequenceRequest, StopCondition
from fleetgen.model.parallel import ParallelState
from tests import server_fixtures
from tests.server_fixtures import make_engine, reference_greedy, reference_logits

GREEDY = Sampling(greedy=True)
checkpoint, reference = server_fixtures.checkpoint, server_fixtures.reference


@pytest.fixture
def engine(checkpoint):
    engine = make_engine(checkpoint, ParallelState.single(), max_batch=2)
    engine.warm_up()
    engine.start()
    yield engine
    engine.stop()


class StepLog:
    """Records every plan the engine launches; the real generator still runs them."""

    def __init__(self, generator):
        self.plans, self._launch = [], generator.launch
        generator.launch = self

    def __call__(self, plan, feed=None):
        self.plans.append((plan.kind, plan.slots.tolist()) + (("fed",) if feed else ()))
        return self._launch(plan, feed=feed)


class FlightLog:
    """Records every launch and land of the engine's generator, in order; the real generator still runs them."""

    def __init__(self, generator):
        self.events, self._launch, self._land = [], generator.launch, generator.land
        generator.launch, generator.land = self.launch, self.land

    def launch(self, plan, feed=None):
        self.events.append(("launch", plan.kind, plan.slots.tolist()))
        return self._launch(plan, feed=feed)

    def land(self, flight):
        self.events.append(("land", flight.plan.kind, flight.plan.slots.tolist()))
        return self._land(flight)


def prompt_of(engine, text):
    return tuple(engine.tokenizer.encode(text))


def test_more_sequences_than_slots_share_decode_steps_and_refill_freed_slots(checkpoint, reference):
    engine = make_engine(checkpoint, ParallelState.single(), max_batch=2)
    log = StepLog(engine.generator)
    texts, budgets = ["def encode(self, o):", "import re", "class JSONDecoder(object):"], [2, 5, 3]
    futures = [engine.submit(SequenceRequest(prompt_of(engine, t), n, GREEDY)) for t, n in zip(texts, budgets)]
    engine.start()  # all three are queued before the first step
    wait(futures, timeout=60)
    engine.stop()
    assert log.plans == [("prefill", [0, 1]), ("decode", [0, 1]),   # the first sequence ends at 2 tokens
                         ("prefill", [0]),                           # the third takes its slot at once
                         ("decode", [0, 1]), ("decode", [0, 1]),      # the third ends at 3 tokens
                         ("decode", [1])]                            # the second at 5
    for text, budget, future in zip(texts, budgets, futures):
        result = future.result()
        assert result.tokens == reference_greedy(reference, list(prompt_of(engine, text)), budget)
        assert result.finish_reason == "length"


def test_decode_steps_run_ahead_fed_on_the_device_and_a_stopped_rows_extra_token_is_dropped(checkpoint,
                                                                                             reference):
    """Each decode step is launched before the last one lands, its tokens fed from the last one's outputs on
    the device; a sequence's budget is known ahead, its stop token only once its step lands, so a stopped row
    has run one step more, whose token is dropped."""
    engine = make_engine(checkpoint, ParallelState.single(), max_batch=2)
    engine.run_ahead = True  # a GPU's default; the CPU's path is the same
    log = StepLog(engine.generator)
    texts, budgets = ["def encode(self, o):", "import re", "class JSONDecoder(object):"], [2, 6, 5]
    prompts = [prompt_of(engine, t) for t in texts]
    full = reference_greedy(reference, list(prompts[2]), 5)
    stop_at = full[2]
    stopped = full[:full.index(stop_at) + 1]  # the third stops before its budget, here at its second token
    assert 2 <= len(stopped) < 5
    futures = [engine.submit(SequenceRequest(p, n, GREEDY, StopCondition(frozenset({stop_at})) if i == 2 else
                                             StopCondition()))
               for i, (p, n) in enumerate(zip(prompts, budgets))]
    engine.start()
    wait(futures, timeout=60)
    engine.stop()
    assert log.plans[:3] == [("prefill", [0, 1]), ("decode", [0, 1], "fed"),  # launched before the prefill landed
                             ("decode", [1], "fed")]                          # the first's budget ends at 2
    assert ("prefill", [0]) in log.plans  # the third takes the freed slot
    for prompt, budget, future in zip(prompts[:2], budgets, futures):
        assert future.result().tokens == reference_greedy(reference, list(prompt), budget)
    third = futures[2].result()
    assert third.tokens == stopped and third.finish_reason == "stop"


def test_every_lane_keeps_a_step_in_flight_and_the_oldest_lands_first(checkpoint, reference):
    engine = make_engine(checkpoint, ParallelState.single(), max_batch=4, lanes=2)  # lanes [0, 1] and [2, 3]
    log = FlightLog(engine.generator)
    texts, budgets = ["def encode(self, o):", "import re", "class JSONDecoder(object):", "x = 1"], [2, 3, 3, 3]
    futures = [engine.submit(SequenceRequest(prompt_of(engine, t), n, GREEDY)) for t, n in zip(texts, budgets)]
    engine.start()
    wait(futures, timeout=60)
    engine.stop()
    assert log.events[:8] == [("launch", "prefill", [0, 1]), ("launch", "prefill", [2, 3]),  # two in flight
                              ("land", "prefill", [0, 1]), ("launch", "decode", [0, 1]),
                              ("land", "prefill", [2, 3]), ("launch", "decode", [2, 3]),
                              ("land", "decode", [0, 1]), ("launch", "decode", [1])]  # the first ended at 2
    assert log.events.count(("land", "decode", [2, 3])) == 2
    for text, budget, future in zip(texts, budgets, futures):
        assert future.result().tokens == reference_greedy(reference, list(prompt_of(engine, text)), budget)


def test_stop_token_and_stop_string_end_a_sequence_and_are_kept(engine, reference):
    prompt = prompt_of(engine, "def raw_decode(self, s, idx=0):")
    full = reference_greedy(reference, list(prompt), 8)
    by_token = engine.submit(SequenceRequest(prompt, 8, GREEDY, StopCondition(frozenset({full[3]})))).result(60)
    assert by_token.tokens == full[:full.index(full[3]) + 1] and by_token.finish_reason == "stop"
    needle = engine.tokenizer.decode(full[:5])[-2:]  # ends inside the fifth token's text, or with it
    assert "\ufffd" not in needle
    by_text = engine.submit(SequenceRequest(prompt, 8, GREEDY, StopCondition(strings=(needle,)))).result(60)
    assert needle in engine.tokenizer.decode(by_text.tokens) and by_text.finish_reason == "stop"
    assert by_text.tokens == full[:len(by_text.tokens)] and len(by_text.tokens) <= 5
    assert needle not in engine.tokenizer.decode(by_text.tokens[:-1])


def test_logprobs_are_log_softmax_of_the_raw_logits(engine, reference):
    prompt = prompt_of(engine, "return _w(s, end).end()")
    result = engine.submit(SequenceRequest(prompt, 4, Sampling(temperature=0.7, top_k=3, seed=5), logprobs=True,
                                           full_logprobs=True)).result(60)
    ids = list(prompt) + result.tokens
    expected = reference_logits(reference, ids)[:-1].log_softmax(-1)  # row i predicts ids[i + 1]
    assert result.full_logprobs.shape == (len(ids) - 1, engine.vocab_size)
    torch.testing.assert_close(result.full_logprobs, expected, atol=1e-4, rtol=1e-4)
    chosen = expected.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(result.logprobs), chosen, atol=1e-4, rtol=1e-4)


def test_cancelled_sequence_frees_its_slot(engine):
    long = engine.submit(SequenceRequest(prompt_of(engine, "x = 1"), 100, GREEDY))
    long.cancel()
    others = [engine.submit(SequenceRequest(prompt_of(engine, t), 3, GREEDY)) for t in ("a", "b")]
    assert [len(f.result(60).tokens) for f in others] == [3, 3]
    assert not engine.scheduler.busy


def test_stop_fails_what_is_queued_and_refuses_new_work(checkpoint):
    engine = make_engine(checkpoint, ParallelState.single(), max_batch=1)
    engine.start()
    futures = [engine.submit(SequenceRequest((1, 2, 3), 120, GREEDY)) for _ in range(3)]
    engine.stop()
    assert not engine.running and all(f.done() for f in futures)
    assert all(isinstance(f.exception(), EngineUnavailable) for f in futures[1:])  # never left the queue
    with pytest.raises(EngineUnavailable, match="stopped"):
        engine.submit(SequenceRequest((1,), 1, GREEDY))


def test_a_failed_step_fails_the_engine_and_its_requests(checkpoint):
    engine = make_engine(checkpoint, ParallelState.single())
    engine.start()
    # temperature 0 without greedy is what the API never lets through; the generator rejects the plan
    bad = engine.submit(SequenceRequest((1, 2), 2, Sampling(temperature=0.0)))
    assert isinstance(bad.exception(60), EngineUnavailable)
    assert "temperature" in engine.error
    with pytest.raises(EngineUnavailable, match="temperature"):
        engine.submit(SequenceRequest((1,), 1, GREEDY))
    engine.stop()


def test_submit_rejects_sequences_that_do_not_fit(engine):
    with pytest.raises(ValueError, match="1 to 128 tokens"):
        engine.submit(SequenceRequest((1,) * 100, 29, GREEDY))
    with pytest.raises(ValueError, match="prompt of 0"):
        engine.submit(SequenceRequest((), 1, GREEDY))
