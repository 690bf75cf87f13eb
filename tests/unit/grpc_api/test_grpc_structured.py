"""Structured outputs over gRPC from the real engine: SamplingParams.structured (json_schema, regex,
choice, grammar) constrains the output; a bad one is INVALID_ARGUMENT naming sampling.structured.<kind>."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest

from cluster.grpc_api import InferenceServicer
from cluster.grpc_server import start_grpc_server
from emoe.client import InferenceClient
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from emoe.v1 import inference_pb2 as pb
from router import Engine
from tests.unit.engine_backend import EngineBackend
from tests.unit.test_structured import SCHEMA


@pytest.fixture(scope="module")
def address(tmp_path_factory, loop):
    path = write_demo_model(tmp_path_factory.mktemp("gso") / "m")
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        server, port = loop.run(start_grpc_server(InferenceServicer(EngineBackend(engine, tok), tok)))
        yield f"127.0.0.1:{port}"
        loop.run(server.stop(0))


def test_structured_outputs_over_grpc(address):
    with InferenceClient(address) as c:
        js = c.complete(
            "JSON:",
            max_tokens=60,
            temperature=1.0,
            seed=2,
            structured=pb.StructuredOutput(json_schema=json.dumps(SCHEMA)),
        )
        rx = c.complete("Code:", max_tokens=20, structured=pb.StructuredOutput(regex=r"[A-F0-9]{6}"))
        streamed = "".join(
            m.text
            for m in c.generate(
                "Pick:",
                max_tokens=20,
                structured=pb.StructuredOutput(choice=pb.Choices(choices=["left", "right"])),
            )
        )
        gram = c.complete(
            "Say:", max_tokens=20, structured=pb.StructuredOutput(grammar='root ::= "ok" | "no"')
        )
    jsonschema.validate(json.loads(js.text), SCHEMA)
    assert js.finish_reason == "stop"
    assert re.fullmatch(r"[A-F0-9]{6}", rx.text)
    assert streamed in ("left", "right")
    assert gram.text in ("ok", "no")


@pytest.mark.parametrize(
    "structured, field",
    [
        (pb.StructuredOutput(json_schema="{nope"), "sampling.structured.json_schema"),
        (pb.StructuredOutput(regex="[^\\x00-\\U0010FFFF]"), "sampling.structured.regex"),
        (pb.StructuredOutput(choice=pb.Choices()), "sampling.structured.choice"),
        (pb.StructuredOutput(grammar="root ::= "), "sampling.structured.grammar"),
        (pb.StructuredOutput(), "sampling.structured"),
    ],
)
def test_bad_structured_is_invalid_argument(address, structured, field):
    with InferenceClient(address) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.complete("x", max_tokens=4, structured=structured)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field), err.value.details()
        assert c.complete("x", max_tokens=2, ignore_eos=True).finish_reason == "length"  # still serving
