"""vLLM's sampling fields over the OpenAI API reach the engine's SamplingParams (issue 15, point 3); bad
values are a 400 naming the field, and the server keeps serving."""

from __future__ import annotations

import openai
import pytest

from tests.unit.http_api.support import CHAT, COMPLETIONS, MODEL, USER, assert_still_serving, client


def test_penalties_bias_min_p_min_tokens_reach_the_engine(url, backend):
    with client(url) as c:
        c.completions.create(
            model=MODEL,
            prompt="hi",
            max_tokens=4,
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            logit_bias={"7": 3.5, "9": -100},
            extra_body={
                "repetition_penalty": 1.2,
                "min_p": 0.05,
                "min_tokens": 2,
                "skip_special_tokens": False,
            },
        )
        s = backend.requests[-1].sampling
        assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.2)
        assert (s.min_p, s.min_tokens, s.skip_special_tokens) == (0.05, 2, False)
        assert s.logit_bias == ((7, 3.5), (9, -100.0))
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, frequency_penalty=0.25)
        assert backend.requests[-1].sampling.frequency_penalty == 0.25


@pytest.mark.parametrize(
    "path, extra, field",
    [
        (COMPLETIONS, {"presence_penalty": 2.5}, "presence_penalty"),
        (CHAT, {"frequency_penalty": -3}, "frequency_penalty"),
        (COMPLETIONS, {"repetition_penalty": 0}, "repetition_penalty"),
        (COMPLETIONS, {"min_p": 1.5}, "min_p"),
        (COMPLETIONS, {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        (COMPLETIONS, {"logit_bias": {"abc": 1}}, "logit_bias"),
        (CHAT, {"logit_bias": {"5": 500}}, "logit_bias"),
        (COMPLETIONS, {"logit_bias": {"999999": 1}}, "logit_bias"),
    ],
)
def test_bad_sampling_values_are_400_naming_the_field(http, path, extra, field):
    body = {"model": MODEL, "max_tokens": 4, **extra}
    body.update({"messages": USER} if path == CHAT else {"prompt": "hi"})
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["param"], r.json()
    assert_still_serving(http)


def test_a_huge_logit_bias_map_is_a_400_and_the_server_keeps_serving(http):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "logit_bias": {str(i): 1 for i in range(5000)}}
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "logit_bias" in err["param"] and "5000 entries, more than 1024" in err["message"], err
    assert_still_serving(http)


def test_the_openai_client_sees_the_400(url):
    with client(url) as c, pytest.raises(openai.BadRequestError, match="presence_penalty"):
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2, presence_penalty=9)
