"""A stand-in for fleetgen's server in batch tests and the memory benchmark: NeMo's PUT /generate and OpenAI's
POST /v1/completions answered at once with text that depends only on the prompt and the sentence's seed, and
knobs for what a real server does wrong (a delay, a crash, 503s), and a prefix cache's bookkeeping (a prompt's
leading 16-character pieces seen before count as cached tokens, 4 characters a token). No model: a fast, exact
oracle."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def stub_completion(prompt: str, seed) -> str:
    return f" [{prompt[::-1][:6]}|{seed}]"


class StubServer:
    """delay_s: seconds before each answer; refuse: prompts containing it get HTTP 400; crash: requests
    containing it have their connection closed unanswered (a prompt that kills the server); down: every
    connection is; unavailable: 503. Counts sentences per server in .sentences."""

    def __init__(self, delay_s: float = 0.0, refuse: str = "REFUSE", token: str | None = None,
                 crash: str | None = None):
        self.delay_s, self.refuse, self.token, self.crash = delay_s, refuse, token, crash
        self.down = self.unavailable = False
        self.sentences, self.requests, self.bodies = 0, 0, []
        self.prompts: list[str] = []  # every prompt answered, in order
        self._cached: set[str] = set()  # the prefixes its "KV cache" holds
        self.reused_tokens = 0  # cached tokens it reported
        self.lock, self.keep_bodies = threading.Lock(), False
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    def answer(self, method: str, path: str, body: dict, headers) -> tuple[int, dict]:
        if self.token and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "missing or wrong API key"}
        if self.unavailable:
            return 503, {"error": "the model is not ready: failed"}
        if path == "/health":
            return 200, {"status": "ready"}
        with self.lock:
            self.requests += 1
            if self.keep_bodies:
                self.bodies.append(body)
        if path == "/generate":
            return self._generate(body)
        return self._complete(body)

    def _generate(self, body: dict) -> tuple[int, dict]:
        if any(self.refuse in s for s in body["sentences"]):
            return 400, {"error": f"sentences: contains {self.refuse}"}
        if body["tokens_to_generate"] > 1000:
            return 400, {"error": "tokens_to_generate: more than the context window"}
        seed = body.get("random_seed")
        answer = {"sentences": [], "token_ids": [], "offsets": [], "tokens": [], "logprob": None, "cached_tokens": []}
        for i, prompt in enumerate(body["sentences"]):
            answer["cached_tokens"].append(self._reuse(prompt))
            completion = stub_completion(prompt, None if body["greedy"] else seed + i)
            prompt_tokens = max(1, len(prompt) // 4)
            new = min(body["tokens_to_generate"], 3)
            answer["sentences"].append(prompt + completion)
            answer["token_ids"].append(list(range(prompt_tokens + new)))
            answer["offsets"].append(list(range(prompt_tokens)) + [len(prompt) + j for j in range(new)])
        with self.lock:
            self.sentences += len(body["sentences"])
        return 200, answer

    def _complete(self, body: dict) -> tuple[int, dict]:
        if not isinstance(body.get("max_tokens", 16), int) or body.get("max_tokens", 16) < 1:
            return 400, {"error": {"message": "max_tokens: Input should be greater than or equal to 1",
                                   "type": "invalid_request_error", "param": None, "code": 400}}
        prompt = body["prompt"]
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        cached, prompt_tokens = self._reuse(text), max(1, len(text) // 4)
        with self.lock:
            self.sentences += 1
        return 200, {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": [{"text": stub_completion(prompt, body.get("seed")), "index": 0, "logprobs": None,
                                  "finish_reason": "length"}],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3,
                               "total_tokens": prompt_tokens + 3, "prompt_tokens_details": {"cached_tokens": cached}}}

    def _reuse(self, prompt: str) -> int:
        """The prompt's tokens found in the cache (whole 16-character pieces of its start seen before, the last
        character always computed), as a prefix-caching server counts them; the prompt is cached after."""
        with self.lock:
            self.prompts.append(prompt)
            found = 0
            while found + 16 < len(prompt) and prompt[:found + 16] in self._cached:
                found += 16
            self._cached.update(prompt[:end] for end in range(16, len(prompt) + 1, 16))
            self.reused_tokens += found // 4
        return found // 4

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                if stub.down or (stub.crash and stub.crash in json.dumps(body)):
                    self.close_connection = True
                    self.connection.close()
                    return
                if stub.delay_s and self.path != "/health":
                    threading.Event().wait(stub.delay_s)
                status, answer = stub.answer(self.command, self.path, body, self.headers)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _serve

        return Handler


def batch_config(input_path, output_path, checkpoint="/unused", recipe="tiny", generation=None, **batch):
    """A LaunchConfig for driving prepare()/run() directly (the servers are the test's own)."""
    from fleetgen.launcher.config import parse_config as parse

    return parse({"recipe": recipe, "cluster": {"kind": "local"}, "model": {"checkpoint": str(checkpoint)},
                  "generation": {"greedy": True, **(generation or {})},
                  "batch": {"input": str(input_path), "output": str(output_path), **batch}})


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def stubs():
    """stubs(**options): a stand-in batch server closed after the test. A test module that uses it says
    pytest_plugins = ["tests.batch_stub"] (not conftest.py: tools/mutation.py runs these tests without it)."""
    made = []

    def make(**options):
        made.append(StubServer(**options))
        return made[-1]

    yield make
    for stub in made:
        stub.close()
