"""The OpenAI-compatible HTTP API under a real uvicorn server, driven by the official `openai` client and
raw HTTP, over a fake backend (no Ray, no model) and the demo model's real tokenizer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from cluster.http_api import build_http_app
from emoe.api import GenerateChunk, GenerateRequest, ModelInfo, Overloaded
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

MODEL = "demo-moe"
TOKEN = "s3cret-token"
MAX_CONTEXT, MAX_TOKENS_LIMIT = 64, 32


class FakeBackend:
    """Echoes: for prompt ids p it yields p[-1]+1, p[-1]+2, ... (mod vocab), one token per chunk.

    Markers in the prompt text pick a behaviour: OVERLOAD raises Overloaded, BOOM an unexpected error,
    LATEBOOM an unexpected error after the first chunk, SLOW sleeps 50 ms before each chunk."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.requests: list[GenerateRequest] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []

    def info(self) -> ModelInfo:
        return ModelInfo(MODEL, "minimax_m2", self.tok.vocab_size, MAX_CONTEXT, MAX_TOKENS_LIMIT, (0,))

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        if "OVERLOAD" in request.prompt_text:
            raise Overloaded("queue full, retry later")
        if request.prompt_text.startswith("BOOM"):
            raise RuntimeError("secret internal detail")
        n, prompt = request.sampling.max_tokens, request.prompt_token_ids
        for i, t in enumerate(echo_ids(prompt, n, self.tok.vocab_size), 1):
            if "SLOW" in request.prompt_text:
                await asyncio.sleep(0.05)
            if "LATEBOOM" in request.prompt_text and i == 2:
                raise RuntimeError("secret internal detail")
            finish = "length" if i == n else None
            yield GenerateChunk(request.request_id, [t], self.tok.decode([t]), finish, len(prompt), i)
        self.completed.append(request.request_id)

    async def cancel(self, request_id: str) -> None:
        await asyncio.sleep(0.01)  # a real suspension: the frontend must shield it from its own cancellation
        self.cancelled.append(request_id)


def echo_ids(prompt: tuple[int, ...] | list[int], n: int, vocab: int) -> list[int]:
    return [(prompt[-1] + i) % vocab for i in range(1, n + 1)]


class Server:
    """A uvicorn server for `app` on 127.0.0.1, on a free port, in a daemon thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(write_demo_model(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def backend(tok) -> FakeBackend:
    return FakeBackend(tok)


@pytest.fixture(scope="module")
def url(backend, tok) -> Iterator[str]:
    with Server(build_http_app(backend, tok, model_name=MODEL, default_max_tokens=4)) as base:
        yield base


@pytest.fixture(scope="module")
def auth_url(backend, tok) -> Iterator[str]:
    with Server(build_http_app(backend, tok, model_name=MODEL, api_token=TOKEN)) as base:
        yield base


@pytest.fixture
def http(url) -> Iterator:
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client


def client(base: str, key: str = "x"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=10)


def expected_text(tok: Tokenizer, prompt_ids: list[int], n: int) -> str:
    return "".join(tok.decode([t]) for t in echo_ids(prompt_ids, n, tok.vocab_size))


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_still_serving(http) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_models_list(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_text_prompt(url, tok):
    out = client(url).completions.create(model=MODEL, prompt="hello world", max_tokens=5)
    ids = tok.encode("hello world")
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == expected_text(tok, ids, 5)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(ids),
        5,
        len(ids) + 5,
    )


def test_completion_token_id_prompt_and_default_max_tokens(url, tok, backend):
    out = client(url).completions.create(model=MODEL, prompt=[5, 6, 7])
    assert out.choices[0].text == expected_text(tok, [7], 4)  # default_max_tokens=4
    assert backend.requests[-1].prompt_token_ids == (5, 6, 7)
    assert backend.requests[-1].sampling.temperature == 1.0  # OpenAI's default


def test_chat_streamed(url, tok, backend):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    stream = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert text == expected_text(tok, ids, 6)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert backend.requests[-1].prompt_token_ids == tuple(ids)


def test_chat_whole_and_stream_usage(url, tok):
    messages = [{"role": "user", "content": "count"}]
    out = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected_text(tok, ids, 3)
    assert out.usage.completion_tokens == 3 and out.usage.prompt_tokens == len(ids)
    stream = client(url).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    last = list(stream)[-1]
    assert last.choices == [] and last.usage.completion_tokens == 3


def test_completion_stream_is_sse(http, tok):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    parts = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in parts) == expected_text(tok, tok.encode("abc"), 3)
    assert parts[-1]["choices"][0]["finish_reason"] == "length"


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    ("empty prompt", COMPLETIONS, {"prompt": ""}, "prompt"),
    ("ids outside vocab", COMPLETIONS, {"prompt": [1, 10**6]}, "prompt"),
    ("negative id", COMPLETIONS, {"prompt": [-1]}, "prompt"),
    ("prompt too long", COMPLETIONS, {"prompt": [5] * MAX_CONTEXT}, "prompt"),
    ("batched prompts", COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
    (
        "max_tokens above limit",
        COMPLETIONS,
        {"prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1},
        "max_tokens",
    ),
    ("prompt + max_tokens", COMPLETIONS, {"prompt": [5] * 40, "max_tokens": 30}, "max_tokens"),
    ("max_tokens string", COMPLETIONS, {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("temperature -1", COMPLETIONS, {"prompt": "hi", "temperature": -1}, "temperature"),
    ("top_p 2", COMPLETIONS, {"prompt": "hi", "top_p": 2}, "top_p"),
    ("top_k -2", COMPLETIONS, {"prompt": "hi", "top_k": -2}, "top_k"),
    ("n 2", COMPLETIONS, {"prompt": "hi", "n": 2}, "n"),
    ("logprobs", COMPLETIONS, {"prompt": "hi", "logprobs": 1}, "logprobs"),
    ("echo", COMPLETIONS, {"prompt": "hi", "echo": True}, "echo"),
    ("empty stop", COMPLETIONS, {"prompt": "hi", "stop": [""]}, "stop"),
    ("stop not strings", COMPLETIONS, {"prompt": "hi", "stop": [1]}, "stop"),
    ("wrong model", COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("missing messages", CHAT, {}, "messages"),
    ("empty messages", CHAT, {"messages": []}, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("chat n 2", CHAT, {"messages": USER, "n": 2}, "n"),
    ("chat wrong model", CHAT, {"messages": USER, "model": "other"}, "model"),
    ("chat temperature -1", CHAT, {"messages": USER, "temperature": -1}, "temperature"),
    ("chat logprobs", CHAT, {"messages": USER, "logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize("path, body, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_400_naming_the_field(http, path, body, param):
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == param, error
    assert_still_serving(http)


RAW = [
    ("malformed JSON", COMPLETIONS, '{"prompt": "hi", ', None, "JSON"),
    ("NaN", COMPLETIONS, '{"prompt": "hi", "temperature": NaN}', "temperature", "finite"),
    (
        "Infinity",
        CHAT,
        '{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
        "top_p",
        "finite",
    ),
    ("not an object", COMPLETIONS, "[1, 2]", None, "JSON object"),
]


@pytest.mark.parametrize("path, raw, param, words", [b[1:] for b in RAW], ids=[b[0] for b in RAW])
def test_bad_json_is_400(http, path, raw, param, words):
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert_still_serving(http)


def test_overloaded_is_429(http, url):
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "OVERLOAD now"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "OVERLOAD"}])
    assert_still_serving(http)


def test_unexpected_error_is_500_without_details(http):
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "BOOM"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text
    assert_still_serving(http)


def test_error_mid_stream_is_an_error_event(http, backend):
    body = {"model": MODEL, "prompt": "LATEBOOM", "max_tokens": 5, "stream": True}
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 200
    events = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e]
    assert events[-1] == {
        "error": {
            "message": events[-1]["error"]["message"],
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "secret" not in r.text and "[DONE]" not in r.text
    assert wait_for(lambda: events[0]["id"] in backend.cancelled)
    assert_still_serving(http)


def test_max_completion_tokens_and_empty_token_refused(http, backend, tok):
    body = {"model": MODEL, "messages": USER, "max_completion_tokens": 2, "max_tokens": 9}
    assert http.post(CHAT, json=body).json()["usage"]["completion_tokens"] == 2
    with pytest.raises(ValueError, match="api_token"):
        build_http_app(backend, tok, model_name=MODEL, api_token="")


def test_unknown_path_is_404_in_openai_shape(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_bearer_token(auth_url):
    with httpx.Client(base_url=auth_url, timeout=10) as h:
        assert h.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = h.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert h.post(COMPLETIONS, json=body).status_code == 401
        assert h.post(COMPLETIONS, json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert h.get("/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(auth_url, "wrong").models.list()
    assert [m.id for m in client(auth_url, TOKEN).models.list().data] == [MODEL]


def test_client_disconnect_mid_stream_cancels(http, backend):
    body = {"model": MODEL, "prompt": "SLOW stream", "max_tokens": 30, "stream": True}
    with http.stream("POST", COMPLETIONS, json=body) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    request_id = json.loads(first.removeprefix("data: "))["id"]
    assert wait_for(lambda: request_id in backend.cancelled), "cancel was not called"
    assert request_id not in backend.completed
    assert_still_serving(http)


def test_client_disconnect_while_waiting_cancels(url, backend):
    body = {"model": MODEL, "prompt": "SLOW whole", "max_tokens": 30}
    with httpx.Client(base_url=url, timeout=0.3) as h, pytest.raises(httpx.ReadTimeout):
        h.post(COMPLETIONS, json=body)
    request_id = next(r.request_id for r in backend.requests if r.prompt_text == "SLOW whole")
    assert wait_for(lambda: request_id in backend.cancelled), "cancel was not called"
    assert request_id not in backend.completed


def test_finished_requests_are_not_cancelled(url, backend):
    out = client(url).completions.create(model=MODEL, prompt="done", max_tokens=2)
    assert out.id in backend.completed and out.id not in backend.cancelled
