"""The OpenAI API over the real engine in process (issue 15): logprobs (completions' `logprobs`, chat's
`logprobs` / `top_logprobs`, streamed and not) equal the model's raw log-softmax; echo and lm-eval's
loglikelihood; batched prompts and `n` choices with their `index`; bad values a 400."""

from __future__ import annotations

import httpx2 as httpx
import pytest
import torch

from cluster.http_api import build_http_app
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.unit.engine_backend import EngineBackend
from tests.unit.http_api.support import CHAT, COMPLETIONS, MODEL, USER, Server, client


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("lp") / "m")
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        backend = EngineBackend(engine, tok)
        with Server(build_http_app(backend, tok, model_name=MODEL)) as url:
            yield url, engine, tok, backend


@pytest.fixture
def served(serving):
    return serving[:3]


def raw_logprobs(engine: Engine, prompt: list[int], out: list[int]) -> list[float]:
    logits = engine.logits([prompt + out])[0]
    raw = torch.log_softmax(logits.float(), dim=-1)
    return [float(raw[len(prompt) - 1 + i, t]) for i, t in enumerate(out)]


def test_completions_logprobs_are_the_raw_model_logprobs(served):
    url, engine, tok = served
    with client(url) as c:
        r = c.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=3
        )
    lp = r.choices[0].logprobs
    prompt = tok.encode("Once upon a time")
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == value  # greedy: the chosen token is the top one
        assert value == max(top.values()) and value <= 0
    # the same values as the model's log-softmax (the ids from a token-id prompt, to avoid re-tokenizing)
    with client(url) as c:
        r2 = c.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=0)
    assert r2.choices[0].text == r.choices[0].text
    ids = engine.generate([prompt], max_tokens=5, ignore_eos=True)[0]
    assert r2.choices[0].logprobs.token_logprobs == pytest.approx(raw_logprobs(engine, prompt, ids), abs=1e-4)


def test_chat_logprobs_streamed_and_not(served):
    url, _, _ = served
    with client(url) as c:
        whole = c.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
        )
        stream = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
        streamed = [
            e for ch in stream for choice in ch.choices if choice.logprobs for e in choice.logprobs.content
        ]
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 6
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token or e.token.startswith("bytes:")
    with client(url) as c:
        plain = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    "path, extra, field",
    [
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"logprobs": True, "top_logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"logprobs": -1}, "logprobs"),
    ],
)
def test_bad_logprobs_are_400(served, path, extra, field):
    url, _, _ = served
    body = {"model": MODEL, "max_tokens": 2, **extra}
    body.update({"messages": USER} if path == CHAT else {"prompt": "hi"})
    r = httpx.post(url + path, json=body, timeout=10)
    assert r.status_code == 400 and field in r.json()["error"]["param"], r.text


def test_echo_sends_the_prompt_and_its_logprobs_first(served):
    url, engine, tok = served
    prompt = tok.encode("The quick brown fox")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    r = httpx.post(url + COMPLETIONS, json=body, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 1 and choice["text"].startswith(tok.decode(prompt))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    raw = torch.log_softmax(engine.logits([prompt])[0].float(), dim=-1)
    want = [float(raw[p - 1, prompt[p]]) for p in range(1, len(prompt))]
    assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx(want, abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])
    streamed = httpx.post(url + COMPLETIONS, json={**body, "stream": True}, timeout=30).text
    assert tok.decode(prompt) in streamed and '"token_logprobs":[null,' in streamed
    plain = httpx.post(url + COMPLETIONS, json={**body, "logprobs": None}, timeout=30).json()
    assert plain["choices"][0]["text"] == choice["text"] and plain["choices"][0]["logprobs"] is None


def test_lm_eval_loglikelihood_equals_the_engine(served):
    """lm-eval's own LocalCompletionsAPI (as `lm_eval --model local-completions` runs it) scores a
    continuation: the sum over its tokens of the model's log-softmax, fp32, within 1e-4."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    url, engine, tok = served
    lm = LocalCompletionsAPI(
        base_url=url + COMPLETIONS, model=MODEL, tokenizer=str(tok.path), tokenizer_backend="huggingface"
    )
    context, continuation = "Once upon a time", " there was a river"
    req = Instance("loglikelihood", {}, (context, continuation), 0)
    [(score, _greedy)] = lm.loglikelihood([req])
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    raw = torch.log_softmax(engine.logits([whole])[0].float(), dim=-1)
    want = sum(float(raw[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
    assert score == pytest.approx(want, abs=1e-4)
    [text] = lm.generate_until(
        [Instance("generate_until", {}, (context, {"max_gen_toks": 4, "until": ["\n\n"]}), 0)]
    )
    greedy = engine.generate([ctx], max_tokens=4)[0]
    assert text == tok.decode(greedy).split("\n\n")[0]


def texts(reply) -> dict[int, str]:
    return {c.index: c.text for c in reply.choices}


def test_batched_prompts_and_n_choices(served):
    url, engine, tok = served
    prompts = ["Once upon a time", "The quick brown fox"]
    greedy = [tok.decode(o) for o in engine.generate([tok.encode(p) for p in prompts], max_tokens=4)]
    with client(url) as c:
        r = c.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
        assert texts(r) == {0: greedy[0], 1: greedy[1]}
        assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
        r = c.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
        assert texts(r) == {0: greedy[0], 1: greedy[0], 2: greedy[1], 3: greedy[1]}  # index = prompt * n + k
        ids = [tok.encode(p) for p in prompts]
        r = c.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
        assert texts(r) == {0: greedy[0], 1: greedy[1]}

        sampled = dict(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=1.0, seed=5, n=3)
        a, b = c.completions.create(**sampled), c.completions.create(**sampled)
        assert texts(a) == texts(b) and len(set(texts(a).values())) > 1  # reproducible, choices differ
        streamed: dict[int, str] = {}
        for chunk in c.completions.create(**sampled, stream=True):
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + choice.text
        assert streamed == texts(a)
        chat = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0, n=2)
        assert [ch.index for ch in chat.choices] == [0, 1]
        assert chat.choices[0].message.content == chat.choices[1].message.content


def test_n_choices_compute_their_shared_prompt_once(serving):
    """n=3 on a new 70-token prompt: choice 0 computes it, choices 1 and 2 are served its 4 full blocks."""
    url, _, tok, backend = serving
    prompt = [(13 * i) % 300 + 20 for i in range(70)]
    hits = backend.ae.stats()["prefix_cache_hits"]
    with client(url) as c:
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=1.0, seed=3, n=3)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2] and r.usage.prompt_tokens == 70
    assert backend.ae.stats()["prefix_cache_hits"] - hits == 2 * 64
