"""The generated stubs in emoe/v1/ are exactly what proto/ generates (run scripts/gen_proto.py if not)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.py*")}
    assert fresh, "protoc generated nothing"
    for rel, data in fresh.items():
        have = ROOT / rel
        assert have.is_file(), f"{rel} missing: run python scripts/gen_proto.py"
        assert have.read_bytes() == data, f"{rel} is stale: run python scripts/gen_proto.py"
