"""The gRPC SamplingParams carry the same sampling fields as the OpenAI API (issue 15, point 3); bad values
are INVALID_ARGUMENT naming the field, and the server stays healthy."""

from __future__ import annotations

import grpc
import pytest

from cluster.grpc_api import InferenceServicer
from emoe.client import InferenceClient
from tests.unit.grpc_api.support import assert_healthy, request, rpc_error


def test_sampling_fields_convert_to_the_engine_params(backend, tok):
    wire = request(
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.25,
        min_p=0.125,
        min_tokens=2,
        logit_bias={9: -100.0, 7: 3.5},
        keep_special_tokens=True,
    )
    s = InferenceServicer(backend, tok).to_request(wire, backend.info()).sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.25)
    assert (s.min_p, s.min_tokens, s.skip_special_tokens) == (0.125, 2, False)
    assert s.logit_bias == ((7, 3.5), (9, -100.0))
    plain = InferenceServicer(backend, tok).to_request(request(), backend.info()).sampling
    assert (plain.presence_penalty, plain.repetition_penalty, plain.skip_special_tokens) == (0.0, 1.0, True)


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 50}, "min_tokens"),
        ({"logit_bias": {5: 500.0}}, "logit_bias"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
    ],
)
def test_bad_sampling_values_are_invalid_argument(channel, stub, fields, name):
    err = rpc_error(stub.Complete, request(**fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.details(), err.details()
    assert_healthy(channel, stub)


def test_python_client_sends_the_fields(start):
    with InferenceClient(start()) as client:
        reply = client.complete(prompt_token_ids=[5, 6], max_tokens=3, frequency_penalty=0.5, min_tokens=1)
    assert len(reply.token_ids) == 3 and reply.finish_reason == "length"
