"""gRPC Tokenize / Detokenize (issue 15, point 5): the server's tokenizer, bad ids INVALID_ARGUMENT naming
the field, the server still healthy after."""

from __future__ import annotations

import grpc

from emoe.client import InferenceClient
from emoe.v1 import inference_pb2 as pb
from tests.unit.grpc_api.support import MAX_CONTEXT, assert_healthy, rpc_error


def test_tokenize_and_detokenize(channel, stub, start, tok):
    reply = stub.Tokenize(pb.TokenizeRequest(text="Once upon a time"))
    assert list(reply.token_ids) == tok.encode("Once upon a time") and reply.max_context == MAX_CONTEXT
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=reply.token_ids)).text == "Once upon a time"
    err = rpc_error(stub.Detokenize, pb.DetokenizeRequest(token_ids=[1, tok.vocab_size]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("token_ids:")
    assert_healthy(channel, stub)


def test_python_client_tokenizes(start, tok):
    with InferenceClient(start()) as client:
        ids = client.tokenize("hello there")
        assert ids == tok.encode("hello there") and client.detokenize(ids) == "hello there"
