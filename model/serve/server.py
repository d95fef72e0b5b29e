"""The replica leader's HTTP front: a FastAPI app served by uvicorn on a thread of its own.

The server listens from construction on, so a job is visibly alive while its ranks load: /health answers
503 "loading" until attach(engine), "warming up" until the engine is (model/serve/engine.py), then 200
"ready" with each rank's device and the start-up's phases; once the replica has failed, 503 "failed" with the
reason. Handlers turn requests into sequences for the engine and await their futures on the event loop; the
model itself runs only on the engine's step thread. Errors are JSON: {"error": "..."} on NeMo's routes,
OpenAI's error object on /v1/*.

Two keys: the job's control token (only its owner has it) is needed for POST /shutdown, and, on a private
server (batch mode), for every route but /health; server.api_key, when set, also opens the generation routes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, InvalidStateError
from typing import Optional

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetgen.model.serve.detokenize import CompletionText
from fleetgen.model.serve.engine import Engine, EngineUnavailable, SequenceRequest, SequenceResult
from fleetgen.model.serve.nemo_api import nemo_response, nemo_sequences
from fleetgen.model.chat_template import ChatTemplate
from fleetgen.model.serve.chat_api import ChatStream, chat_response, chat_sequences
from fleetgen.model.serve.openai_api import (CompletionStream, completion_response, completion_sequences,
                                            models_response)
from fleetgen.model.serve.request_schemas import (ChatCompletionRequest, CompletionRequest, GenerateRequest,
                                                  OpenAISampling, RequestError, parse, read_json)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30
GRACEFUL_SHUTDOWN_S = 5  # open connections (a streaming client) get this long once shutdown starts
VERDICT_WAIT_S = 5  # how long a request hit by an engine failure waits for the replica's reason


class Server:
    def __init__(self, host: str, port: int, api_key: Optional[str] = None, max_body_bytes: int = 4 << 20,
                 model_name: str = "fleetgen", control_token: Optional[str] = None, private: bool = False,
                 chat_template: Optional[ChatTemplate] = None):
        """Bind host:port (0 = any free port, see .port) and start answering at once. Without a control token
        (a server embedded in a program) /shutdown is guarded like the generation routes. Without a chat
        template, chat requests are answered 400."""
        self.model_name, self.max_body_bytes, self._api_key = model_name, max_body_bytes, api_key
        self.chat_template = chat_template
        self._control_token, self._private = control_token, private
        self._engine: Optional[Engine] = None
        self._failure: Optional[str] = None
        self._pending: set[Future] = set()  # every sequence a handler waits for, so that fail() can answer it
        self._judged = False  # an engine failure is judged by wait()'s on_engine_failure, which calls fail()
        self._stop_requested = threading.Event()
        self._created = int(time.time())
        self.app = self._build_app()
        self._socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port: int = self._socket.getsockname()[1]
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                      lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="fleetgen-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server: the HTTP server on {host}:{self.port} did not start")
            time.sleep(0.01)

    def attach(self, engine: Engine) -> None:
        """The model is loaded on every rank: start the engine, which serves once it has warmed up."""
        engine.start()
        self._engine = engine

    def fail(self, message: str) -> None:
        """The replica failed (loading, a rank, a step): /health reports it until the process ends, and the
        requests in flight or queued are answered 503 with the reason, as are new ones."""
        self._failure = message
        for future in list(self._pending):
            try:
                future.set_exception(EngineUnavailable(f"the replica failed: {message}"))
            except InvalidStateError:  # answered meanwhile
                pass

    def shutdown(self) -> None:
        """Ask wait() to stop everything (what POST /shutdown and SIGTERM do)."""
        self._stop_requested.set()

    def wait(self, on_engine_failure: Optional[Callable[[str], None]] = None) -> None:
        """Block until shutdown is asked (POST /shutdown, SIGTERM, SIGINT) or the engine fails; then stop the
        engine (which releases the followers) and the HTTP server. Raises if the engine failed, unless
        on_engine_failure takes it (with the server still answering: it ends the process itself)."""
        self._judged = on_engine_failure is not None
        restore = self._catch_signals()
        try:
            while not self._stop_requested.wait(0.5):
                if self._engine is not None and self._engine.error and on_engine_failure is not None:
                    on_engine_failure(self._engine.error)
                if not self._thread.is_alive() or (self._engine is not None and self._engine.error):
                    break
        finally:
            self._close()
            restore()
        if self._engine is not None and self._engine.error:
            raise RuntimeError(f"server: {self._engine.error}")

    def status(self) -> tuple[int, dict]:
        """/health's answer: HTTP status and body."""
        error = self._failure or (self._engine.error if self._engine is not None else None)
        if error:
            return 503, {"status": "failed", "error": error}
        if self._stop_requested.is_set():
            return 503, {"status": "stopping"}
        if self._engine is None:
            return 503, {"status": "loading"}
        if not self._engine.ready.is_set():
            return 503, {"status": "warming up"}
        return 200, {"status": "ready", "devices": self._engine.devices,
                     "startup_s": {phase: round(s, 2) for phase, s in self._engine.startup_s.items()},
                     "kv_cache": self._engine.cache_report()}

    def _close(self) -> None:
        self._stop_requested.set()
        if self._engine is not None:
            self._engine.stop()  # queued and running requests are answered 503
        self._uvicorn.should_exit = True
        self._thread.join()
        self._socket.close()

    def _catch_signals(self) -> Callable[[], None]:
        """SIGTERM/SIGINT request a clean shutdown; signals can only be caught on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, lambda *_: self._stop_requested.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    # ---- the app

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fleetgen", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(RequestError, self._request_error)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        app.add_exception_handler(Exception, self._internal_error)
        app.add_api_route("/health", self._health, methods=["GET"])
        # the model cards wait with `curl -X PUT http://HOST:PORT`: any method on / answers like /health
        app.add_api_route("/", self._health, methods=["GET", "HEAD", "PUT", "POST"])
        guarded = [Depends(self._authorize)]
        app.add_api_route("/generate", self._generate, methods=["PUT"], dependencies=guarded)
        app.add_api_route("/v1/completions", self._completions, methods=["POST"], dependencies=guarded)
        app.add_api_route("/v1/chat/completions", self._chat, methods=["POST"], dependencies=guarded)
        app.add_api_route("/v1/models", self._models, methods=["GET"], dependencies=guarded)
        owner_only = [Depends(self._authorize_control)]
        app.add_api_route("/shutdown", self._shutdown, methods=["POST"], dependencies=owner_only)
        return app

    async def _health(self) -> JSONResponse:
        status, body = self.status()
        return JSONResponse(body, status_code=status)

    async def _generate(self, request: Request) -> JSONResponse:
        engine = self._ready_engine()
        body = parse(GenerateRequest, read_json(await self._body(request)))
        results = await self._run_all(engine, nemo_sequences(body, engine))
        return JSONResponse(nemo_response(body, results, engine.tokenizer))

    async def _completions(self, request: Request):
        engine = self._ready_engine()
        body = self._openai_body(CompletionRequest, await self._body(request))
        sequences = completion_sequences(body, engine)
        if body.stream:
            return self._stream(CompletionStream(body, self.model_name, engine.tokenizer), body, sequences, engine)
        results = await self._run_all(engine, sequences)
        return JSONResponse(completion_response(body, sequences, results, engine, self.model_name))

    async def _chat(self, request: Request):
        engine = self._ready_engine()
        body = self._openai_body(ChatCompletionRequest, await self._body(request))
        sequences = chat_sequences(body, engine, self.chat_template)
        if body.stream:
            return self._stream(ChatStream(body, self.model_name, engine.tokenizer), body, sequences, engine)
        results = await self._run_all(engine, sequences)
        return JSONResponse(chat_response(body, sequences, results, engine, self.model_name))

    def _openai_body(self, schema: type[OpenAISampling], raw: bytes) -> OpenAISampling:
        body = parse(schema, read_json(raw))
        if body.model != self.model_name:
            raise RequestError(404, f"model: {body.model!r} is not served here; this server serves "
                                    f"{self.model_name!r}")
        return body

    async def _models(self) -> JSONResponse:
        return JSONResponse(models_response(self.model_name, self._created))

    async def _shutdown(self) -> JSONResponse:
        if self._failure is not None:
            raise RequestError(503, f"the replica failed and is exiting by itself: {self._failure}")
        self.shutdown()
        return JSONResponse({"status": "stopping"})

    async def _authorize(self, request: Request) -> None:
        if self._api_key is None and not self._private:
            return
        _check_bearer(request, [self._api_key, self._control_token],
                      "send the header 'Authorization: Bearer <key>' (server.api_key, or the job's control token)")

    async def _authorize_control(self, request: Request) -> None:
        if self._control_token is None:
            return await self._authorize(request)
        _check_bearer(request, [self._control_token],
                      "POST /shutdown needs the job's control token: 'Authorization: Bearer <token>' with the "
                      "token in the job folder's control-token file")

    def _ready_engine(self) -> Engine:
        status, body = self.status()
        if status != 200:
            raise RequestError(503, f"the model is not ready: {body['status']}"
                                    + (f" ({body['error']})" if "error" in body else ""))
        return self._engine

    async def _body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"body of {declared} bytes exceeds the limit of {limit} (server.max_body_bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body exceeds the limit of {limit} bytes (server.max_body_bytes)")
        return bytes(body)

    # ---- running sequences

    def _submit(self, engine: Engine, sequence: SequenceRequest, on_token=None) -> Future:
        try:
            future = engine.submit(sequence, on_token)
        except EngineUnavailable as e:
            raise RequestError(503, str(e)) from None
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        if self._failure is not None:  # failed between the handler's check and now
            self.fail(self._failure)
        return future

    async def _run_all(self, engine: Engine, sequences: list[SequenceRequest]) -> list[SequenceResult]:
        futures = [self._submit(engine, s) for s in sequences]
        try:
            return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except EngineUnavailable as e:
            raise RequestError(503, await self._unavailable(e)) from None
        finally:
            for future in futures:  # a sibling failed or the handler was cancelled: free their slots
                future.cancel()

    async def _unavailable(self, error: Exception) -> str:
        """A failed engine fails the replica. When something judges that (wait's on_engine_failure), answer with
        its verdict, which names the rank, rather than with the failed collective's own words."""
        deadline = time.monotonic() + (VERDICT_WAIT_S if self._judged else 0)
        while self._failure is None and self._engine is not None and self._engine.error and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return f"the replica failed: {self._failure}" if self._failure else str(error)

    def _stream(self, chunks, body: OpenAISampling, sequences: list[SequenceRequest],
                engine: Engine) -> StreamingResponse:
        """chunks: the dialect's chunk maker (openai_api.CompletionStream, chat_api.ChatStream)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(item) -> None:  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                pass

        futures = []
        for i, sequence in enumerate(sequences):
            future = self._submit(engine, sequence, on_token=lambda token, i=i: deliver((i, token)))
            future.add_done_callback(lambda done, i=i: deliver((i, done)))
            futures.append(future)
        return StreamingResponse(self._events(chunks, body, sequences, futures, events, engine),
                                 media_type="text/event-stream")

    async def _events(self, chunks, body: OpenAISampling, sequences: list[SequenceRequest], futures: list,
                      events: asyncio.Queue, engine: Engine) -> AsyncIterator[str]:
        """Server-sent events: the dialect's opening chunks, one chunk per piece of new text, a last chunk per
        sequence with its finish_reason, the usage when asked (stream_options.include_usage), then [DONE]."""
        texts = [CompletionText(engine.tokenizer, list(s.prompt), list(s.stop.strings), engine.eos_id)
                 for s in sequences]
        try:
            for chunk in chunks.opening(sequences):
                yield _sse(chunk)
            for _ in futures:
                i, item = await events.get()
                while isinstance(item, int):
                    delta = texts[i].add(item)
                    if delta:
                        yield _sse(chunks.delta(i, delta))
                    i, item = await events.get()
                if item.exception() is not None:
                    message = await self._unavailable(item.exception())
                    yield _sse({"error": {"message": message, "type": "server_error", "code": 503}})
                    return
                yield _sse(chunks.final(i, texts[i].finish(), item.result().finish_reason))
            if body.include_usage:
                yield _sse(chunks.usage([future.result() for future in futures]))
            yield "data: [DONE]\n\n"
        finally:
            for future in futures:  # the client went away: free the slots
                future.cancel()

    # ---- errors as data

    async def _request_error(self, request: Request, error: RequestError) -> JSONResponse:
        return _error(request, error.status, error.message)

    async def _http_error(self, request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(request, error.status_code, f"{request.method} {request.url.path}: {error.detail}")

    async def _internal_error(self, request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return _error(request, 500, f"internal error: {type(error).__name__}: {error}")


def _check_bearer(request: Request, keys: list[Optional[str]], how: str) -> None:
    given = request.headers.get("authorization", "").encode()
    if not any(key and hmac.compare_digest(given, f"Bearer {key}".encode()) for key in keys):
        raise RequestError(401, f"missing or wrong key: {how}")


def _error(request: Request, status: int, message: str) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                            status_code=status)
    return JSONResponse({"error": message}, status_code=status)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
