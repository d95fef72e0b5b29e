"""The HTTP server over the real tiny GPT-2: NeMo's contract, OpenAI's, health, life cycle and concurrency."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import requests
import torch

from fleetgen.model.parallel import ParallelState
from fleetgen.model.serve.server import Server
from tests import server_fixtures
from tests.server_fixtures import (MODEL, build_tiny_checkpoint, fleetgen_threads, make_engine,
                                   reference_greedy, reference_logits, reference_model, serving)

HEADERS = {"Content-Type": "application/json"}
PROMPTS = ["def decode(self, s, _w=WHITESPACE.match):", "Café, naïve", "import re", "class JSONEncoder(object):",
           "    return _default_decoder.decode(s)", "x"]
checkpoint, reference = server_fixtures.checkpoint, server_fixtures.reference


@pytest.fixture(scope="module")
def served(checkpoint):
    with serving(checkpoint) as served:
        yield served


@pytest.fixture(scope="module")
def tok(served):
    return served.engine.tokenizer


def put(served, **body):
    response = requests.put(f"{served.url}/generate", data=json.dumps(body), headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def generated(answer, k, prompt_len):
    return answer["token_ids"][k][prompt_len:]


# ---- health and life cycle

def test_health_says_loading_until_attached_and_ready_after(checkpoint):
    server = Server("127.0.0.1", 0, model_name=MODEL)
    url = f"http://127.0.0.1:{server.port}"
    assert (requests.get(f"{url}/health").status_code, requests.get(f"{url}/health").json()) == \
        (503, {"status": "loading"})
    waiting = requests.put(url)  # the model cards' wait loop: `curl -X PUT http://HOST:PORT`
    assert waiting.status_code == 503 and waiting.json() == {"status": "loading"}
    early = requests.put(f"{url}/generate", json={"sentences": ["a"]})
    assert early.status_code == 503 and "not ready: loading" in early.json()["error"]
    ps = ParallelState.single()
    engine = make_engine(checkpoint, ps)
    capturing, captured = threading.Event(), threading.Event()
    capture = engine.generator.capture_graphs
    engine.generator.capture_graphs = lambda: capturing.set() or captured.wait(30) and capture()
    server.attach(engine)  # the engine warms up on its own thread
    assert capturing.wait(30)
    assert (requests.get(f"{url}/health").status_code, requests.put(url).json()) == (503, {"status": "warming up"})
    captured.set()
    assert engine.wait_ready(30)
    health = requests.get(f"{url}/health").json()
    assert health["status"] == "ready" and health["devices"] == ["rank 0: cpu"] and requests.put(url).status_code == 200
    assert set(health["startup_s"]) == {"warm_up", "capture"}
    assert health["kv_cache"] == {"blocks": 4 * 128 // 16, "free_blocks": 4 * 128 // 16, "prompt_tokens_computed": 0,
                                  "prompt_tokens_reused": 0, "preemptions": 0}
    server.shutdown()
    server.wait()


def test_a_failed_load_is_reported_by_health():
    server = Server("127.0.0.1", 0, model_name=MODEL)
    server.fail("CheckpointError: /ckpt/config.json: no such file")
    health = requests.get(f"http://127.0.0.1:{server.port}/health")
    assert health.status_code == 503
    assert health.json() == {"status": "failed", "error": "CheckpointError: /ckpt/config.json: no such file"}
    server.shutdown()
    server.wait()


def test_shutdown_answers_pending_requests_and_leaves_no_thread_or_socket(checkpoint):
    with serving(checkpoint, max_batch=1) as served:
        url, started, step = served.url, threading.Event(), served.engine.generator.launch
        served.engine.generator.launch = lambda plan, feed=None: started.set() or step(plan, feed)
        with ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(requests.put, f"{url}/generate", timeout=60,
                                   json={"sentences": [p], "tokens_to_generate": 100, "greedy": True})
                       for p in PROMPTS + PROMPTS[:2]]
            assert started.wait(30)
            stop = requests.post(f"{url}/shutdown")
            assert stop.status_code == 200 and stop.json() == {"status": "stopping"}
            served.server.wait()
            answers = [f.result() for f in pending]
    refused = [a.json()["error"] for a in answers if a.status_code != 200]
    assert refused and all(a.status_code in (200, 503) for a in answers)  # never a dropped connection
    assert "the server is shutting down" in refused
    assert fleetgen_threads() == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)


@pytest.mark.slow
def test_sigterm_stops_a_serving_process_cleanly(checkpoint):
    script = ("import sys; from pathlib import Path; from fleetgen.model.parallel import ParallelState; "
              "from fleetgen.model.serve.server import Server; from tests.server_fixtures import make_engine\n"
              "server = Server('127.0.0.1', 0); engine = make_engine(Path(sys.argv[1]), ParallelState.single())\n"
              "engine.warm_up(); server.attach(engine); print(server.port, flush=True); server.wait()\n"
              "print('stopped', flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(checkpoint)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        port = proc.stdout.readline().strip()
        assert port.isdigit(), proc.stderr.read()
        assert requests.get(f"http://127.0.0.1:{port}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "stopped"


def test_api_key_guards_everything_but_health(checkpoint):
    with serving(checkpoint, api_key="s3cret") as served:
        body = {"sentences": ["a"], "tokens_to_generate": 2}
        assert requests.get(f"{served.url}/health").status_code == 200
        denied = requests.put(f"{served.url}/generate", json=body)
        assert denied.status_code == 401 and "Authorization: Bearer" in denied.json()["error"]
        wrong = requests.put(f"{served.url}/generate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert requests.post(f"{served.url}/shutdown").status_code == 401
        ok = requests.put(f"{served.url}/generate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="s3cret")
        assert [m.id for m in client.models.list()] == [MODEL]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope").models.list()


def test_a_body_over_the_limit_is_a_413_and_the_server_goes_on(checkpoint):
    with serving(checkpoint, max_body_bytes=4096) as served:
        big = {"sentences": ["a" * 5000]}
        response = httpx.put(f"{served.url}/generate", json=big)
        assert response.status_code == 413 and "server.max_body_bytes" in response.json()["error"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b" " * 1000

        streamed = httpx.put(f"{served.url}/generate", content=chunks())
        assert streamed.status_code == 413
        assert httpx.put(f"{served.url}/generate", json={"sentences": ["a"], "tokens_to_generate": 2}).status_code \
            == 200


def test_unknown_routes_and_methods_answer_json(served):
    missing = requests.get(f"{served.url}/nope")
    assert missing.status_code == 404 and missing.json() == {"error": "GET /nope: Not Found"}
    wrong = requests.get(f"{served.url}/generate")
    assert wrong.status_code == 405 and "Method Not Allowed" in wrong.json()["error"]


# ---- NeMo's PUT /generate

def test_the_gpt2b_model_card_request_runs_unchanged(served, tok):
    data = {"sentences": ["Tell me an interesting fact about space travel."] * 1, "tokens_to_generate": 50,
            "temperature": 1.0, "add_BOS": True, "top_k": 0, "top_p": 0.9, "greedy": False, "all_probs": False,
            "repetition_penalty": 1.2, "min_tokens_to_generate": 2}
    response = requests.put(f"{served.url}/generate", data=json.dumps(data), headers=HEADERS)
    assert response.status_code == 200, response.text
    answer = response.json()
    # NeMo's fields, and fleetgen's cached_tokens (prompt tokens found in the KV cache: none, on a first request)
    assert set(answer) == {"sentences", "tokens", "logprob", "token_ids", "offsets", "cached_tokens"}
    assert answer["logprob"] is None and answer["cached_tokens"] == [0]
    prompt = [tok.bos_id] + tok.encode(data["sentences"][0])
    ids = answer["token_ids"][0]
    assert ids[:len(prompt)] == prompt and 2 <= len(ids) - len(prompt) <= 50
    assert answer["sentences"][0].startswith(data["sentences"][0])
    assert answer["sentences"][0] == tok.decode(ids[1:])  # the added BOS is not part of the text
    assert len(answer["tokens"][0]) == len(answer["offsets"][0]) == len(ids)
    assert tok.eos_id not in ids[len(prompt):-1]  # the end-of-document token ends a sequence


def test_the_nemotron_model_card_request_runs_unchanged(served, tok, reference):
    prompt = "Write a poem on NVIDIA in the style of Shakespeare"
    data = {"sentences": [prompt], "tokens_to_generate": 32, "temperature": 1.0, "add_BOS": False, "top_k": 0,
            "top_p": 1.0, "greedy": True, "all_probs": False, "repetition_penalty": 1.0,
            "min_tokens_to_generate": 1, "end_strings": ["<|endoftext|>", "<extra_id_1>", "\x11", "<extra_id_1>User"]}
    answer = requests.put(f"{served.url}/generate", data=json.dumps(data), headers=HEADERS).json()
    ids = tok.encode(prompt)
    expected = reference_greedy(reference, ids, 32)
    got = generated(answer, 0, len(ids))
    assert got == expected[:len(got)]
    assert len(got) == 32 or got[-1] == tok.eos_id or any(s in tok.decode(got) for s in data["end_strings"][1:])


def test_greedy_matches_transformers_for_every_sentence(served, tok, reference):
    answer = put(served, sentences=PROMPTS, tokens_to_generate=12, greedy=True, end_strings=[])
    for k, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        expected = reference_greedy(reference, ids, 12)
        if tok.eos_id in expected:  # the end-of-document token ends a sequence and is kept
            expected = expected[:expected.index(tok.eos_id) + 1]
        assert generated(answer, k, len(ids)) == expected
        assert answer["sentences"][k] == prompt + tok.decode(expected)


def test_top_k_1_and_a_tiny_top_p_sample_the_argmax(served, tok):
    greedy = put(served, sentences=PROMPTS, tokens_to_generate=8, greedy=True)
    top_k = put(served, sentences=PROMPTS, tokens_to_generate=8, top_k=1, temperature=2.0, top_p=0.0)
    top_p = put(served, sentences=PROMPTS, tokens_to_generate=8, top_p=1e-6, temperature=0.5)
    assert greedy["token_ids"] == top_k["token_ids"] == top_p["token_ids"]


def test_sampled_tokens_stay_within_top_k_and_top_p(served, tok, reference):
    for top_k, top_p, temperature in ((5, 0.0, 3.0), (0, 0.5, 1.3)):
        answer = put(served, sentences=PROMPTS[:3], tokens_to_generate=10, top_k=top_k, top_p=top_p,
                     temperature=temperature, random_seed=11, end_strings=[])
        for k, prompt in enumerate(PROMPTS[:3]):
            ids = answer["token_ids"][k]
            n = len(tok.encode(prompt))
            logits = reference_logits(reference, ids)[n - 1:-1] / temperature  # row j chooses ids[n + j]
            for row, token in zip(logits, ids[n:]):
                rank = int((row > row[token]).sum())
                if top_k:
                    assert rank < top_k
                else:
                    ordered = row.softmax(-1).sort(descending=True).values
                    assert float(ordered[:rank].sum()) <= top_p + 1e-5  # mass ranked above it is below p


def test_a_random_seed_makes_sampling_reproducible(served):
    body = dict(sentences=["import re"] * 2, tokens_to_generate=12, temperature=1.5, top_p=1.0, end_strings=[])
    first, again = put(served, random_seed=7, **body), put(served, random_seed=7, **body)
    other = put(served, random_seed=8, **body)
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]
    assert first["token_ids"][0] != first["token_ids"][1]  # sentence i is seeded with random_seed + i


def test_repetition_penalty_really_applies(served, tok, reference):
    prompt, penalty = "def f(x): return f(x)", 3.0
    answer = put(served, sentences=[prompt], tokens_to_generate=10, top_k=1, repetition_penalty=penalty,
                 end_strings=[])
    ids = tok.encode(prompt)
    for _ in range(10):  # CTRL's penalty over every token seen so far, then the argmax
        logits = reference_logits(reference, ids)[-1]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[ids] = True
        penalised = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        ids.append(int(penalised.argmax()))
    assert answer["token_ids"][0] == ids
    plain = put(served, sentences=[prompt], tokens_to_generate=10, top_k=1, end_strings=[])
    assert plain["token_ids"] != answer["token_ids"]


def test_min_tokens_to_generate_blocks_only_the_end_of_document_token(tmp_path):
    checkpoint = build_tiny_checkpoint(tmp_path / "eos", eos_loving=True)
    reference = reference_model(checkpoint)
    with serving(checkpoint) as served:
        tok = served.engine.tokenizer
        ids = tok.encode("import re")
        free = put(served, sentences=["import re"], tokens_to_generate=10, greedy=True)
        assert generated(free, 0, len(ids)) == [tok.eos_id]
        held = put(served, sentences=["import re"], tokens_to_generate=10, greedy=True, min_tokens_to_generate=3)
        got = generated(held, 0, len(ids))
        assert len(got) == 4 and got[-1] == tok.eos_id
        for token in got[:3]:
            logits = reference_logits(reference, ids)[-1]
            logits[tok.eos_id] = float("-inf")
            assert token == int(logits.argmax())
            ids.append(token)


def test_end_strings_stop_on_a_single_token_or_on_text(served, tok, reference):
    prompt = PROMPTS[0]
    ids = tok.encode(prompt)
    full = reference_greedy(reference, ids, 10)
    piece = tok.decode([full[2]])
    assert tok.encode(piece) == [full[2]]
    by_token = put(served, sentences=[prompt], tokens_to_generate=10, greedy=True, end_strings=[piece])
    got = generated(by_token, 0, len(ids))
    assert got == full[:full.index(full[2]) + 1] and by_token["sentences"][0].endswith(piece)
    text = tok.decode(full[3:5])
    by_text = put(served, sentences=[prompt], tokens_to_generate=10, greedy=True, end_strings=[text])
    got = generated(by_text, 0, len(ids))
    assert text in tok.decode(got) and text not in tok.decode(got[:-1]) and got == full[:len(got)]


def test_logprobs_match_a_reference_log_softmax(served, tok, reference):
    answer = put(served, sentences=PROMPTS[:3], tokens_to_generate=5, greedy=True, add_BOS=True,
                 compute_logprob=True, all_probs=True)
    for k in range(3):
        ids = answer["token_ids"][k]
        expected = reference_logits(reference, ids)[:-1].log_softmax(-1)  # row i predicts ids[i + 1]
        full = torch.tensor(answer["full_logprob"][k])
        assert full.shape == (len(ids) - 1, tok.vocab_size)
        torch.testing.assert_close(full, expected, atol=1e-4, rtol=1e-4)
        chosen = expected.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(answer["logprob"][k]), chosen, atol=1e-4, rtol=1e-4)


def test_a_prompt_longer_than_the_context_window_is_a_400_naming_the_lengths(served, tok):
    long = "word " * 200
    response = requests.put(f"{served.url}/generate", json={"sentences": ["ok", long], "tokens_to_generate": 10})
    n = len(tok.encode(long))
    assert response.status_code == 400
    assert response.json()["error"] == (f"sentences[1] is {n} tokens; with tokens_to_generate=10 that makes "
                                        f"{n + 10}, more than the context window of 128 tokens")


def test_clients_that_vanish_mid_answer_stop_their_sequences_and_give_every_kv_block_back(checkpoint):
    with serving(checkpoint, max_batch=4) as served:
        expected = put(served, sentences=PROMPTS[:2], tokens_to_generate=8, greedy=True)
        rows, step = [], served.engine.generator.launch
        served.engine.generator.launch = lambda plan, feed=None: rows.append(plan.n) or step(plan, feed)
        for i in range(6):  # streams read to their first piece of text, then dropped
            body = {"model": MODEL, "prompt": PROMPTS[i % 5], "max_tokens": 96, "stream": True,
                    "temperature": 0.7, "seed": i}
            with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as response:
                next(line for line in response.iter_lines() if '"text": "' in line and '"text": ""' not in line)
        for i in range(3):  # plain requests whose client closes its socket once sent
            data = json.dumps({"sentences": [PROMPTS[i]], "tokens_to_generate": 20}).encode()
            with socket.create_connection(("127.0.0.1", served.server.port)) as sock:
                sock.sendall(b"PUT /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        deadline = time.monotonic() + 60
        while served.engine.scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not served.engine.scheduler.busy
        blocks = served.engine.blocks
        assert not blocks.tables and blocks.free_blocks == len(blocks.blocks)
        assert sum(rows) < 6 * 96 / 2  # the streams stopped long before their 96 tokens
        again = put(served, sentences=PROMPTS[:2], tokens_to_generate=8, greedy=True)
        assert again["token_ids"] == expected["token_ids"]


def test_many_concurrent_requests_share_steps_and_equal_requests_sent_one_by_one(checkpoint):
    bodies = [{"sentences": [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))],
               "tokens_to_generate": 4 + i % 9, "greedy": True} for i in range(64)]
    with serving(checkpoint, max_batch=8) as served:
        sizes, step = [], served.engine.generator.launch
        served.engine.generator.launch = lambda plan, feed=None: sizes.append(plan.n) or step(plan, feed)
        one_by_one = [put(served, **body) for body in bodies]
        sequential_steps, sizes[:] = len(sizes), []
        with ThreadPoolExecutor(64) as pool:
            together = list(pool.map(lambda body: put(served, **body), bodies))
    def tokens(answers):  # the second round finds the first's prompts in the cache: cached_tokens differ
        return [{k: v for k, v in answer.items() if k != "cached_tokens"} for answer in answers]

    assert tokens(together) == tokens(one_by_one)
    assert max(sizes) == 8 and len(sizes) < sequential_steps / 3


# ---- OpenAI's /v1

@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")


def test_openai_completions_greedy_with_real_usage(client, tok, reference):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert completion.object == "text_completion" and completion.model == MODEL
    assert [c.index for c in completion.choices] == [0, 1]
    for choice, prompt in zip(completion.choices, PROMPTS):
        expected = reference_greedy(reference, tok.encode(prompt), 6)
        if tok.eos_id in expected:
            expected = expected[:expected.index(tok.eos_id)]
        assert choice.text == tok.decode(expected)
        assert choice.finish_reason == ("length" if len(expected) == 6 else "stop")
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS[:2])
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.total_tokens == prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.completion_tokens <= 12


def test_openai_stream_gives_the_same_text_as_one_answer(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_openai_stop_strings_cut_the_text(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0]
    stop = plain.text[4:6]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == plain.text[:plain.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_openai_echo_and_logprobs(client, tok, reference):
    prompt = PROMPTS[3]
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                           logprobs=2)
    choice = completion.choices[0]
    assert choice.text.startswith(prompt)
    ids = tok.encode(prompt) + reference_greedy(reference, tok.encode(prompt), 4)
    expected = reference_logits(reference, ids)[:-1].log_softmax(-1)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ends = lp.text_offset[1:] + [len(choice.text)]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(choice.text[a:b] in ("", t) for t, a, b in zip(lp.tokens, lp.text_offset, ends))
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(expected[j - 1, ids[j]]), abs=1e-4)
        assert max(lp.top_logprobs[j].values()) == pytest.approx(float(expected[j - 1].max()), abs=1e-4)


def test_openai_errors_are_openai_error_objects(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=0)
    assert [m.id for m in client.models.list()] == [MODEL]
