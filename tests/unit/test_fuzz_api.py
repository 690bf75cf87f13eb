"""Property-based bad input over every field of the gRPC and HTTP requests: only INVALID_ARGUMENT / 4xx
(or success), never INTERNAL / 500, and the server is healthy afterwards."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoe.v1 import inference_pb2 as pb
from tests.unit.grpc_api.fixtures import backend, channel, loop, start, stub, tok  # noqa: F401
from tests.unit.grpc_api.support import assert_healthy
from tests.unit.http_api.fixtures import http, url  # noqa: F401
from tests.unit.http_api.support import assert_still_serving

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
OK_GRPC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

sampling = st.builds(
    pb.SamplingParams,
    max_tokens=st.integers(0, 2**32 - 1),
    temperature=FLOATS,
    top_p=FLOATS,
    top_k=INT32,
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    stop=st.lists(st.text(max_size=8), max_size=4),
    stop_token_ids=st.lists(INT32, max_size=4),
    ignore_eos=st.booleans(),
)
requests = st.builds(
    pb.GenerateRequest,
    prompt=st.text(max_size=40),
    prompt_token_ids=st.lists(INT32, max_size=12),
    sampling=st.one_of(st.none(), sampling),
    request_id=st.text(max_size=300),
)


@SETTINGS
@given(req=requests)
def test_grpc_fields(stub, req):  # noqa: F811
    try:
        stub.Complete(req, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in OK_GRPC, code


@SETTINGS
@given(raw=st.binary(max_size=64))
def test_grpc_raw_bytes(channel, raw):  # noqa: F811
    call = channel.unary_unary(
        "/emoe.v1.Inference/Complete", request_serializer=None, response_deserializer=None
    )
    try:
        call(raw, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in OK_GRPC, code


def test_grpc_server_healthy_after_fuzzing(channel, stub):  # noqa: F811
    assert_healthy(channel, stub)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "n",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "echo",
    "stream_options",
    "max_completion_tokens",
]


@SETTINGS
@given(
    body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6),
    chat=st.booleans(),
    messages=JSON_VALUES,
)
def test_http_fields(http, body, chat, messages):  # noqa: F811
    if chat:
        body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": messages}
        path = "/v1/chat/completions"
    else:
        path = "/v1/completions"
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def test_http_server_healthy_after_fuzzing(http):  # noqa: F811
    assert_still_serving(http)


@pytest.mark.parametrize(
    "raw", [b"{", b"\xff\xfe", b'{"prompt": NaN}', b"[]", b'{"prompt": "x", "max_tokens": 1e999}']
)
def test_http_malformed_bodies(http, raw):  # noqa: F811
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
