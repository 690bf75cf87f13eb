"""The real application on the session's Ray cluster, its expected outputs, and its clients.

`launch` is the one way an e2e module starts the application: greedy reference tokens from the in-process
engine first, then a fresh Serve instance with `cluster.app:build_app(cfg)` on it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_errors(errors: Sequence[str], lines: int = 40) -> str:
    """The failures a test saw, with what the server logged about each: for every request id named in
    `errors` ("internal error (request_id ...); see the server log"), the Ray session's log lines from that
    id on (the traceback). A CI failure then says why, without the logs of a machine that is gone."""
    import glob
    import re

    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    session = node.get_session_dir_path() if node is not None else "/tmp/ray/session_latest"
    ids = sorted({m for e in errors for m in re.findall(r"request_id '([0-9a-f]+)'", e)})[:3]
    out = [f"{len(errors)} failed: {errors[:3]}"]
    for path in sorted(glob.glob(f"{session}/logs/**/*", recursive=True)):
        if not path.endswith((".log", ".err", ".out")):
            continue
        try:
            text = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for rid in ids:
            at = next((i for i, line in enumerate(text) if rid in line), None)
            if at is not None:
                out.append(f"--- {path} ({rid})\n" + "\n".join(text[at : at + lines]))
        if not ids:  # no id to look for: the dispatch and engine failures themselves
            hits = [i for i, line in enumerate(text) if "engine step failed" in line]
            for at in hits[:2]:
                out.append(f"--- {path}\n" + "\n".join(text[at : at + lines]))
    return "\n".join(out)


def reference_tokens(
    model: Path,
    prompts: Sequence[str],
    max_tokens: int | Sequence[int],
    *,
    ignore_eos: bool = True,
    sampling: dict[int, dict[str, Any]] | None = None,
) -> list[list[int]]:
    """What the in-process engine generates for each prompt, one request at a time (as a client sends
    them). `max_tokens` is one for all or one per prompt; `sampling` maps a prompt's index to its
    sampling parameters (greedy where absent)."""
    lengths = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    sampling = sampling or {}
    tok = Tokenizer(model)
    with Engine.from_pretrained(model) as engine:
        return [
            engine.generate([tok.encode(p)], max_tokens=n, ignore_eos=ignore_eos, **sampling.get(i, {}))[0]
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]


@dataclass(frozen=True)
class Served:
    name: str
    handle: Any  # the Frontend's DeploymentHandle
    grpc: str  # host:port of the gRPC data plane
    http: str  # base URL of the Serve HTTP proxy
    want: dict[str, list[int]] = field(default_factory=dict)  # prompt -> greedy reference tokens


Launch = Callable[..., Served]


@pytest.fixture(scope="module")
def launch(ray_cluster) -> Iterator[Launch]:
    """`launch(name, route_prefix, cfg, prompts=(), max_tokens=0) -> Served`:

    1. the greedy reference tokens of `prompts` (ignore_eos, `max_tokens` each) from the in-process
       engine on `cfg["model"]`, computed before the cluster is busy serving;
    2. a fresh Serve instance, HTTP on a free loopback port (HTTP options apply only to a new one);
    3. `cluster.app:build_app(cfg)` deployed as `name` at `route_prefix`.

    One application at a time: a second launch in the module replaces the first. At the end of the module
    the application is deleted and Serve shut down."""
    from ray import serve

    from cluster.app import build_app

    names: list[str] = []

    def start(
        name: str, route_prefix: str, cfg: dict[str, Any], prompts: Sequence[str] = (), max_tokens: int = 0
    ) -> Served:
        want = reference_tokens(Path(cfg["model"]), prompts, max_tokens) if prompts else []
        serve.shutdown()
        http_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        names.append(name)
        handle = serve.run(build_app(cfg), name=name, route_prefix=route_prefix)
        grpc_port = handle.addresses.remote().result()["grpc_port"]
        return Served(
            name,
            handle,
            f"127.0.0.1:{grpc_port}",
            f"http://127.0.0.1:{http_port}",
            dict(zip(prompts, want, strict=True)),
        )

    yield start
    if names:
        try:
            serve.delete(names[-1])
        finally:
            serve.shutdown()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("e2e") / "demo")


@pytest.fixture(scope="module")
def app(launch, demo_model) -> Served:
    """`cluster.app:build_app` with 2 expert groups and the gRPC data plane."""
    from cluster.app import APP_NAME

    cfg = dict(model=str(demo_model), groups=2, transport="grpc", grpc_port=0, max_queue=64, kv_blocks=512)
    return launch(APP_NAME, "/", cfg)


@pytest.fixture
def channel(app: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(app.grpc) as ch:
        yield ch
