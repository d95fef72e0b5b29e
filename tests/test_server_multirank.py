"""A replica over real processes (TP=2, PP=2, then both): the leader serves, the followers run every step it
sends, answers equal the one-process reference, and POST /shutdown ends every rank."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from fleetgen.model.tokenizer import load_tokenizer
from tests import server_fixtures
from tests.distributed import run_ranks
from tests.server_fixtures import MODEL, reference_greedy, reference_logits, serve_on_ranks

PROMPTS = ["def decode(self, s):", "import re", "Café, naïve", "class JSONEncoder(object):"]
checkpoint, reference = server_fixtures.checkpoint, server_fixtures.reference


class Replica:
    """run_ranks on a thread, so the test can talk to the leader while the ranks run."""

    def __init__(self, checkpoint, tensor, pipeline, port_file):
        self.outcome = {}
        self.port_file = port_file
        self.thread = threading.Thread(target=self._run, args=(str(checkpoint), tensor, pipeline, str(port_file)))
        self.thread.start()

    def _run(self, *args):
        try:
            self.outcome["ranks"] = run_ranks(serve_on_ranks, args[1] * args[2], *args)
        except AssertionError as e:  # a rank failed; run_ranks carries its traceback
            self.outcome["error"] = str(e)

    def url(self, timeout_s=300) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            assert self.thread.is_alive() and time.monotonic() < deadline, self.outcome.get("error", "no port")
            time.sleep(0.1)
        return f"http://127.0.0.1:{self.port_file.read_text()}"


@pytest.mark.slow
@pytest.mark.parametrize("tensor, pipeline", [(2, 1), (1, 2), (2, 2)])
def test_a_replica_over_processes_answers_like_the_reference_and_stops_on_shutdown(tmp_path, checkpoint, reference,
                                                                                  tensor, pipeline):
    replica = Replica(checkpoint, tensor, pipeline, tmp_path / "port")
    url = replica.url()
    health = requests.get(f"{url}/health").json()
    assert health["status"] == "ready" and len(health["devices"]) == tensor * pipeline  # every rank's device
    tok = load_tokenizer(checkpoint)

    answer = requests.put(f"{url}/generate", json={"sentences": PROMPTS, "tokens_to_generate": 6, "greedy": True,
                                                   "end_strings": [], "compute_logprob": True}).json()
    for k, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        expected = reference_greedy(reference, ids, 6)
        if tok.eos_id in expected:
            expected = expected[:expected.index(tok.eos_id) + 1]
        assert answer["token_ids"][k] == ids + expected
        logprobs = reference_logits(reference, ids + expected)[:-1].log_softmax(-1)
        for j, value in enumerate(answer["logprob"][k]):
            assert value == pytest.approx(float(logprobs[j, (ids + expected)[j + 1]]), abs=1e-4)

    with ThreadPoolExecutor(8) as pool:  # concurrent requests share the replica's steps
        bodies = [{"sentences": [p], "tokens_to_generate": 3 + i, "greedy": True} for i, p in enumerate(PROMPTS * 2)]
        together = list(pool.map(lambda b: requests.put(f"{url}/generate", json=b).json(), bodies))
    alone = [requests.put(f"{url}/generate", json=b).json() for b in bodies]
    assert together == alone

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0, stream=True))
    assert streamed == client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5,
                                                 temperature=0).choices[0].text

    assert requests.post(f"{url}/shutdown").json() == {"status": "stopping"}
    replica.thread.join(120)
    assert not replica.thread.is_alive()
    followers = ["followed until shutdown"] * (tensor * pipeline - 1)
    assert replica.outcome.get("ranks") == [[], *followers], replica.outcome.get("error")
