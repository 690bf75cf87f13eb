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
        server, port = loop.run(
            start_grpc_server(
                InferenceServicer(EngineBackend(engine, tok, max_context=1024, max_tokens_limit=256), tok)
            )
        )
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


def test_n_choices_over_grpc(address):
    """SamplingParams.n: Generate streams the choices tagged by index, each ending with its own finish and
    usage; Complete returns them all in `choices`; choice k is seeded with seed + k."""
    with InferenceClient(address) as c:
        whole = c.complete("Once", max_tokens=6, temperature=1.0, seed=11, n=3, ignore_eos=True)
        messages = list(c.generate("Once", max_tokens=6, temperature=1.0, seed=11, n=3, ignore_eos=True))
        alone = [
            c.complete("Once", max_tokens=6, temperature=1.0, seed=11 + k, ignore_eos=True) for k in range(3)
        ]
        with pytest.raises(grpc.RpcError) as err:
            c.complete("Once", max_tokens=2, n=17)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.n" in err.value.details()
    assert [ch.index for ch in whole.choices] == [0, 1, 2]
    assert [list(ch.token_ids) for ch in whole.choices] == [list(a.token_ids) for a in alone]
    assert list(whole.token_ids) == list(alone[0].token_ids)
    streamed = {k: [t for m in messages if m.index == k for t in m.token_ids] for k in range(3)}
    assert streamed == {k: list(alone[k].token_ids) for k in range(3)}
    finals = [m for m in messages if m.finish_reason]
    assert sorted(m.index for m in finals) == [0, 1, 2]
    assert all(m.usage.completion_tokens == 6 and m.finish_reason == "length" for m in finals)
    assert len({m.request_id for m in messages}) == 1


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}


def test_tools_and_reasoning_over_grpc(address):
    """GenerateRequest.tools with a named tool_choice: a schema-valid call in tool_calls (name first, then
    argument pieces), finish_reason tool_calls; separate_reasoning moves <think> text into `reasoning`."""
    tool = pb.Tool(name="get_weather", description="forecast", parameters_json=json.dumps(WEATHER))
    request = pb.GenerateRequest(
        prompt="Weather?", tools=[tool], tool_choice="get_weather", sampling=pb.SamplingParams(max_tokens=200)
    )
    with InferenceClient(address) as c:
        whole = c._stub.Complete(request, timeout=60)
        messages = list(c._stub.Generate(request, timeout=60))
        think = pb.GenerateRequest(
            prompt="Q: hi\n<think>\n",
            separate_reasoning=True,
            sampling=pb.SamplingParams(
                max_tokens=60, structured=pb.StructuredOutput(regex=r"[a-z]{3,6} [a-z]{3,6}</think>\n\nYes\.")
            ),
        )
        split = c._stub.Complete(think, timeout=60)
    assert whole.finish_reason == "tool_calls" and not whole.text
    [call] = whole.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    pieces = [d for m in messages for d in m.tool_calls]
    assert pieces[0].name == "get_weather" and all(not d.name for d in pieces[1:]) and len(pieces) > 1
    assert json.loads("".join(d.arguments for d in pieces)) == json.loads(call.arguments)
    assert messages[-1].finish_reason == "tool_calls"
    assert len(split.reasoning.split()) == 2 and split.text == "Yes."


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"tools": [pb.Tool(name="f", parameters_json="{nope")]}, "tools.0.parameters_json"),
        ({"tools": [pb.Tool(name="f", parameters_json='{"type": "objekt"}')]}, "tools.0.parameters_json"),
        ({"tools": [pb.Tool(name="f")], "tool_choice": "g"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_tools_are_invalid_argument(address, fields, name):
    with InferenceClient(address) as c:
        with pytest.raises(grpc.RpcError) as err:
            c._stub.Complete(pb.GenerateRequest(prompt="x", **fields), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(name), (
        err.value.details()
    )
