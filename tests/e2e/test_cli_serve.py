"""`emoe serve` as a user starts it: reaches `ready`, answers `emoe generate`, exits cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from tests.e2e.conftest import free_port
from tests.waiting import wait_until

EMOE = [sys.executable, "-m", "cli.main"]


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command) of every live (non-zombie) process."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True
    ).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, stat, args = line.split(None, 3) + [""] * (4 - len(line.split(None, 3)))
        if not stat.startswith("Z"):
            table[int(pid)] = (int(ppid), stat, args)
    return table


def descendants(root: int) -> set[int]:
    table, found = processes(), {root}
    grew = True
    while grew:
        new = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return found - {root}


def test_emoe_serve_generate_and_sigterm(demo_model, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    http_port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*EMOE, "serve", "--model", str(demo_model), "--grpc-port", "0", "--http-port", str(http_port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )

    def serve_log() -> str:
        assert proc.poll() is None, log.read_text()  # `emoe serve` keeps running while it deploys
        return log.read_text()

    try:
        wait_until(
            serve_log,
            240,
            "`emoe serve` to print ready",
            until=lambda t: "ready" in t.splitlines(),
            interval_s=0.5,
        )
        text = log.read_text()
        assert "ready" in text.splitlines(), text
        assert "ExpertGroup-0" in text  # progress was shown while deploying
        grpc_addr = re.search(r"gRPC:\s+(\S+)", text).group(1)
        assert f"http://127.0.0.1:{http_port}/v1" in text
        gen = subprocess.run(
            [*EMOE, "generate", "Once upon a time", "--address", grpc_addr, "--max-tokens", "6"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert gen.returncode == 0, gen.stderr
        assert "[finish_reason: length]" in gen.stdout or "[finish_reason: stop]" in gen.stdout
        started = descendants(proc.pid)
        names = " ".join(processes()[p][2] for p in started if p in processes())
        assert "raylet" in names and "gcs_server" in names, names  # the Ray it started
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()
        assert "shutting down" in log.read_text()

        def left_behind() -> dict[int, tuple[int, str, str]]:
            table = processes()
            return {p: table[p] for p in set(table) & started}

        wait_until(left_behind, 30, "the Ray processes to exit", until=lambda left: not left, interval_s=0.5)
        left = left_behind()
        assert not left, f"Ray processes left behind: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
