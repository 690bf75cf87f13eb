"""Structured outputs in the engine (issue 15): xgrammar grammars compiled off the loop and cached, their
token bitmask applied in the batched sampler, bad or slow grammars an InvalidRequest naming the field."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from emoe.api import GenerateRequest, GrammarSpec, InvalidRequest, SamplingParams
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig
from router.engine.sampling import SequenceSampling, sample
from router.engine.structured import Grammars

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["answer", "count", "tags"],
}
# slow to compile: many bounded string patterns (about a second even with the demo's 1k vocabulary)
SLOW_SCHEMA = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,500}"} for i in range(60)},
    "required": [f"p{i}" for i in range(60)],
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("so") / "m")
    with Engine.from_pretrained(path, num_groups=2) as engine:
        yield engine, Tokenizer(path)


def run(engine, tok, config, *requests):
    """Runs the requests concurrently in one AsyncEngine; per request its text and finish reason, or the
    exception it raised."""

    async def main():
        ae = AsyncEngine(engine.spec, engine.model, engine.dispatcher, config, tok)

        async def one(req):
            text, finish = "", None
            async for c in ae.generate(req):
                text, finish = text + c.text, c.finish_reason
            return text, finish

        try:
            return await asyncio.gather(*(one(r) for r in requests), return_exceptions=True), ae
        finally:
            await ae.close()

    return asyncio.run(main())


def req(tok, spec, i=0, temperature=1.0, max_tokens=48, prompt="Tell me"):
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, structured=spec)
    return GenerateRequest(f"r{i}", tuple(tok.encode(prompt)), sampling)


def test_outputs_follow_json_schema_regex_choice_and_grammar_in_one_batch(model):
    engine, tok = model
    regex = r"[A-Z][a-z]{2,5}-\d{3}"
    choices = ("red", "green", "blue sky", 'say "hi"')
    specs = [
        GrammarSpec("json", json.dumps(SCHEMA)),
        GrammarSpec("json", json.dumps(SCHEMA)),
        GrammarSpec("regex", regex),
        GrammarSpec("choice", choices=choices),
        GrammarSpec("grammar", 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?'),
        None,  # an unconstrained request in the same batch
    ]
    results, ae = run(engine, tok, EngineConfig(), *(req(tok, s, i) for i, s in enumerate(specs)))
    for text, finish in results[:2]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert re.fullmatch(regex, results[2][0]) and results[2][1] == "stop"
    assert results[3][0] in choices and results[3][1] == "stop"
    assert re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", results[4][0]), results[4]
    assert results[5][1] == "length"  # random weights: the free request runs to max_tokens
    assert ae.grammars.compiled == 4  # the schema compiled once for both requests


def test_greedy_structured_output_is_the_best_allowed_token(model):
    """Masking must not change which allowed token wins: greedy output under `choice` equals scoring each
    choice's first token directly."""
    engine, tok = model
    choices = ("alpha", "beta", "gamma", "delta")
    (result,), _ = run(engine, tok, EngineConfig(), req(tok, GrammarSpec("choice", choices=choices), 0, 0.0))
    prompt = tok.encode("Tell me")
    logits = engine.logits([prompt])[0][-1].float()
    firsts = {c: tok.encode(c)[0] for c in choices}
    best = max(firsts, key=lambda c: float(logits[firsts[c]]))
    assert result[0].startswith(tok.decode([firsts[best]]))


def test_bitmask_in_the_batched_sampler_masks_only_its_rows(model):
    engine, tok = model
    vocab = engine.spec.vocab_size
    grammars = Grammars(tok.path, vocab, tuple(engine.spec.eos_token_ids))
    matcher = asyncio.run(grammars.matcher(GrammarSpec("regex", "[0-9]+")))
    digits = {t for t in range(tok.vocab_size) if tok.decode([t]) and tok.decode([t]).isdigit()}
    logits = torch.randn(3, vocab)
    free = SamplingParams(temperature=1.0, seed=3)
    seqs = [
        SequenceSampling(free, frozenset(), grammar=matcher),
        SequenceSampling(free, frozenset()),
        SequenceSampling(SamplingParams(temperature=0.0), frozenset()),
    ]
    for _ in range(20):
        ids, _ = sample(logits, seqs)
        assert ids[0] in digits
        assert ids[2] == int(logits[2].argmax())
        seqs[0].seed += 1
    assert not torch.isinf(logits).any()  # the caller's logits are not masked in place
    plain, _ = sample(logits[1:], seqs[1:])
    assert plain[1] == int(logits[2].argmax())


def test_bad_grammars_are_invalid_requests_naming_the_field(model):
    engine, tok = model
    bad = [
        GrammarSpec("json", '{"type": "object", "properties": ', field="response_format.json_schema.schema"),
        GrammarSpec("json", '{"type": "nosuchtype"}'),
        GrammarSpec("regex", "(unclosed", field="structured_outputs.regex"),
        GrammarSpec("regex", r"[^\x00-\U0010FFFF]", field="structured_outputs.regex"),  # matches nothing
        GrammarSpec("grammar", 'root ::= ( "a" ', field="structured_outputs.grammar"),
    ]
    results, ae = run(engine, tok, EngineConfig(), *(req(tok, s, i) for i, s in enumerate(bad)))
    for spec, result in zip(bad, results, strict=True):
        assert isinstance(result, InvalidRequest) and result.field == spec.field, result
    assert "not valid JSON" in str(results[0]) and "nosuchtype" in str(results[1])
    assert "no text matches" in str(results[3])
    with pytest.raises(InvalidRequest, match="more than"):
        GrammarSpec("regex", "a" * 70_000)
    with pytest.raises(InvalidRequest, match="choice"):
        GrammarSpec("choice", choices=())


def test_a_grammar_too_slow_to_compile_is_refused_while_the_engine_serves(model):
    engine, tok = model
    slow = GrammarSpec("json", json.dumps(SLOW_SCHEMA), field="response_format.json_schema.schema")

    async def main():
        ae = AsyncEngine(
            engine.spec, engine.model, engine.dispatcher, EngineConfig(grammar_timeout_s=0.2), tok
        )
        try:

            async def drain(r):
                return [c async for c in ae.generate(r)]

            slow_task = asyncio.create_task(drain(req(tok, slow, 1)))
            plain = await drain(req(tok, None, 2, max_tokens=8))  # served while the grammar compiles
            with pytest.raises(InvalidRequest) as err:
                await slow_task
            with pytest.raises(InvalidRequest, match="longer than"):  # remembered: refused at once
                await asyncio.wait_for(drain(req(tok, slow, 3)), 0.1)
            return plain, err.value, ae.grammars
        finally:
            await ae.close()

    plain, err, grammars = asyncio.run(main())
    assert plain[-1].finish_reason == "length" and sum(len(c.token_ids) for c in plain) == 8
    assert err.field == "response_format.json_schema.schema" and "longer than 0.2 s" in str(err)
    assert grammars.timeouts == 1 and grammars.compiled == 1


def test_resumed_request_continues_its_grammar(model):
    """A stream resumed on another router (prompt + the tokens already sent, resume_offset) carries on in
    the grammar where the first left off, so the whole output still matches."""
    engine, tok = model
    regex = r"[a-z]{4}-[0-9]{4}"
    spec = GrammarSpec("regex", regex)
    (first,), _ = run(engine, tok, EngineConfig(), req(tok, spec, 5, temperature=0.0))
    assert re.fullmatch(regex, first[0])
    done = tok.encode(first[0])[:2]
    prompt = tuple(tok.encode("Tell me")) + tuple(done)
    sampling = SamplingParams(max_tokens=46, temperature=0.0, seed=5, structured=spec)
    resumed = GenerateRequest("r9~1", prompt, sampling, resume_offset=len(done))
    (rest,), _ = run(engine, tok, EngineConfig(), resumed)
    assert re.fullmatch(regex, tok.decode(done) + rest[0]) and rest[1] == "stop"


def test_a_complete_grammar_ends_the_sequence_despite_min_tokens(model):
    """Once the grammar allows only a stop token, min_tokens (which masks it) yields to the grammar: the
    output is the grammar's text and ends with "stop", not a token drawn from an all-masked row."""
    engine, tok = model
    sampling = SamplingParams(
        max_tokens=20,
        min_tokens=10,
        temperature=1.0,
        seed=1,
        structured=GrammarSpec("choice", choices=("ok",)),
    )
    (result,), _ = run(engine, tok, EngineConfig(), GenerateRequest("m", tuple(tok.encode("Say")), sampling))
    assert result == ("ok", "stop")
