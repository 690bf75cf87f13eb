"""Fixtures (re-exported by this package's conftest): the OpenAI HTTP API under a real uvicorn server over a fake backend."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import pytest

from cluster.http_api import build_http_app
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from tests.unit.http_api.support import MODEL, TOKEN, FakeBackend, Server


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(write_demo_model(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def backend(tok) -> FakeBackend:
    return FakeBackend(tok)


@pytest.fixture(scope="module")
def url(backend, tok) -> Iterator[str]:
    with Server(build_http_app(backend, tok, model_name=MODEL, default_max_tokens=4)) as base:
        yield base


@pytest.fixture(scope="module")
def auth_url(backend, tok) -> Iterator[str]:
    with Server(build_http_app(backend, tok, model_name=MODEL, api_token=TOKEN)) as base:
        yield base


@pytest.fixture
def http(url) -> Iterator:
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client
