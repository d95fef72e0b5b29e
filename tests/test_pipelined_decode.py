"""Pipeline stages at work at once: over real processes at pipeline 2, the leader's stage runs the next lane's
step while the last stage still runs the previous one, and the answers stay the one-process reference's."""
import time
from pathlib import Path

import pytest

from fleetgen.model.parallel import ParallelState
from fleetgen.model.tokenizer import load_tokenizer
from fleetgen.model.serve.engine import Sampling, SequenceRequest
from tests import server_fixtures
from tests.distributed import run_ranks
from tests.server_fixtures import make_engine, reference_greedy

PROMPTS = ["def decode(self, s):", "import re", "Café, naïve", "class JSONEncoder(object):"]
NEW_TOKENS = 6
LAST_STAGE_DELAY_S = 0.05  # a slow last stage: the leader's stage must not wait for it
checkpoint, reference = server_fixtures.checkpoint, server_fixtures.reference


def _serve_and_time(rank: int, world_size: int, checkpoint: str):
    """Every rank's (start, end) monotonic times of each launch, in launch order; the leader's answers too."""
    ps = ParallelState.build(1, 2)
    engine = make_engine(Path(checkpoint), ps, max_batch=4)  # lanes [0, 1] and [2, 3]
    engine.warm_up()
    times, launch = [], engine.generator.launch

    def timed(plan, feed=None):
        started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of this machine
        flight = launch(plan, feed)
        times.append((started, time.monotonic()))
        return flight
    engine.generator.launch = timed
    if ps.is_last_stage:
        layers = engine.generator.stage.decode_layers
        engine.generator.stage.decode_layers = lambda *args: time.sleep(LAST_STAGE_DELAY_S) or layers(*args)
        engine.follow()
        return times, None
    engine.start()
    futures = [engine.submit(SequenceRequest(tuple(engine.tokenizer.encode(p)), NEW_TOKENS, Sampling(greedy=True)))
               for p in PROMPTS]
    answers = [f.result(120).tokens for f in futures]
    engine.stop()
    return times, answers


@pytest.mark.slow
def test_the_first_stage_runs_the_next_lane_while_the_last_stage_runs_this_one(checkpoint, reference):
    (leader, answers), (last_stage, _) = run_ranks(_serve_and_time, 2, str(checkpoint))
    assert len(leader) == len(last_stage)  # every rank ran every step
    # launch k + 1 began on the leader before the last stage had finished launch k, at most steps
    overlapped = sum(leader[k + 1][0] < last_stage[k][1] for k in range(len(leader) - 1))
    assert overlapped >= (len(leader) - 1) // 2, (leader, last_stage)
    tokenizer = load_tokenizer(checkpoint)
    for prompt, answer in zip(PROMPTS, answers):
        assert answer == reference_greedy(reference, tokenizer.encode(prompt), NEW_TOKENS)
