"""vLLM's tokenizer endpoints (issue 15, point 5): /tokenize (text or chat messages), /detokenize,
/tokenizer_info, /version; bad input is a 400 naming the field and the server keeps serving."""

from __future__ import annotations

from emoe import __version__
from tests.unit.http_api.support import MAX_CONTEXT, MODEL, USER, assert_still_serving


def test_tokenize_and_detokenize_round_trip(http, tok):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Once upon a time"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Once upon a time")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_CONTEXT
    back = http.post("/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": "Once upon a time"}


def test_tokenize_chat_messages_uses_the_chat_template(http, tok):
    r = http.post("/tokenize", json={"messages": USER, "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    messages = [{"role": "user", "content": "hi"}]
    assert r.json()["tokens"] == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def test_tokenizer_info_and_version(http, tok):
    info = http.get("/tokenizer_info").json()
    assert info["model"] == MODEL and info["vocab_size"] == tok.vocab_size and info["eos_token_ids"] == [0]
    assert info["max_model_len"] == MAX_CONTEXT and "chat_template" in info
    assert http.get("/version").json() == {"version": __version__}


def test_bad_tokenizer_requests_are_400_naming_the_field(http, tok):
    cases = [
        ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"model": "other", "prompt": "a"}, "model"),
        ("/detokenize", {"tokens": [1, tok.vocab_size + 5]}, "tokens"),
        ("/detokenize", {"tokens": ["x"]}, "tokens"),
    ]
    for path, body, param in cases:
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["param"].split(".")[0] == param, r.json()
    assert_still_serving(http)
