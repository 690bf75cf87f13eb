"""The release's recommended sampling (generation_config.json) applies where a request leaves a parameter
unset, on both APIs, and both say what the defaults are (issue 14)."""

from __future__ import annotations

import dataclasses

import httpx2 as httpx

from cluster.grpc_api import InferenceServicer
from cluster.http_api import build_http_app
from emoe.api import ModelInfo
from emoe.v1 import inference_pb2 as pb
from tests.unit.http_api.support import COMPLETIONS, MODEL, FakeBackend, Server

MINIMAX_M2 = (("temperature", 1.0), ("top_p", 0.95), ("top_k", 40.0))  # its generation_config.json


class WithDefaults(FakeBackend):
    def info(self) -> ModelInfo:
        return dataclasses.replace(super().info(), sampling_defaults=MINIMAX_M2)


def test_http_unset_parameters_take_the_model_defaults_and_models_lists_them(tok):
    backend = WithDefaults(tok)
    with Server(build_http_app(backend, tok, model_name=MODEL)) as url, httpx.Client(base_url=url) as http:
        card = http.get("/v1/models").json()["data"][0]
        assert card["sampling_defaults"] == {"temperature": 1.0, "top_p": 0.95, "top_k": 40.0}
        assert (
            http.post(COMPLETIONS, json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200
        )
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0, "top_p": 0.5, "top_k": -1}
        assert http.post(COMPLETIONS, json=body).status_code == 200
    unset, given = (r.sampling for r in backend.requests)
    assert (unset.temperature, unset.top_p, unset.top_k) == (1.0, 0.95, 40)
    assert (given.temperature, given.top_p, given.top_k) == (0.0, 0.5, 0)


def test_grpc_unset_parameters_take_the_model_defaults(tok):
    backend = WithDefaults(tok)
    servicer = InferenceServicer(backend, tok)
    info = backend.info()
    unset = servicer.to_request(pb.GenerateRequest(prompt_token_ids=[5, 6]), info).sampling
    assert (unset.temperature, unset.top_p, unset.top_k) == (1.0, 0.95, 40)
    greedy = pb.SamplingParams(temperature=0.0, top_k=0)  # set explicitly: greedy, no top-k
    given = servicer.to_request(pb.GenerateRequest(prompt_token_ids=[5, 6], sampling=greedy), info).sampling
    assert (given.temperature, given.top_p, given.top_k) == (0.0, 0.95, 0)


def test_without_defaults_the_apis_keep_their_own(tok):
    servicer = InferenceServicer(FakeBackend(tok), tok)
    s = servicer.to_request(pb.GenerateRequest(prompt_token_ids=[5]), FakeBackend(tok).info()).sampling
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 1.0, 0)  # greedy, as the proto documents
