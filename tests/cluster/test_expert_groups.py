"""Expert-group actors: GPUs, node spread, lazy slices, registry, and failover when a replica dies."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray

from emoe.demo import write_demo_model
from emoe.layout import expert_keys
from emoe.spec import ModelSpec
from router import Engine
from tests.hf_fixtures import make_hf_checkpoint
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_hf_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), seed=11)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def describe(engine) -> list[dict]:
    return ray.get([a.describe.remote() for a in engine.dispatcher.actors])


def test_each_replica_holds_its_own_gpu_and_reads_only_its_experts(ray_cluster, mixtral):
    spec = ModelSpec.from_pretrained(mixtral)
    with Engine.from_pretrained(mixtral, dispatcher="grpc", num_groups=4) as engine:
        infos = describe(engine)
        placement = engine.dispatcher.placement
    gpus = [(i["node_id"], i["gpu_ids"]) for i in infos]
    assert all(len(g) == 1 for _, g in gpus), gpus
    assert len(set(gpus)) == 4  # 4 logical GPUs in the cluster, one per replica
    for info in infos:
        held = placement.groups[info["group"]]
        mine = {k for layer, ids in held.items() for e in ids for k in expert_keys(spec, layer, e)}
        assert set(info["tensors_read"]) == mine


def test_spread_places_groups_on_both_nodes(ray_cluster, mixtral):
    with Engine.from_pretrained(mixtral, dispatcher="dist", num_groups=2, spread="spread") as engine:
        nodes = {i["node_id"] for i in describe(engine)}
        assert engine.logits([[1, 2, 3]])[0].shape == (3, 128)
    assert len(nodes) == 2


def test_close_removes_the_actors(ray_cluster, mixtral):
    engine = Engine.from_pretrained(mixtral, dispatcher="grpc", num_groups=2)
    actors = engine.dispatcher.actors
    engine.close()

    def gone(actor) -> bool:
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return True
        return False

    for a in actors:
        wait_until(lambda a=a: gone(a), 30, f"actor {a} to be gone after close()")


def test_router_learns_of_added_and_removed_replicas(ray_cluster, mixtral):
    from experts.deployment import ExpertGroupReplica

    with Engine.from_pretrained(mixtral, dispatcher="grpc", num_groups=2) as engine:
        d = engine.dispatcher
        extra = (
            ray.remote(ExpertGroupReplica)
            .options(num_cpus=0, num_gpus=0)
            .remote(str(mixtral), 1, d.placement.to_json(), "float32", d.registry)
        )
        extra_id = ray.get(extra.ping.remote())
        wait_until(
            lambda: _pool_ids(engine, 1), 30, "2 replicas of group 1 in the pool", until=lambda n: n == 2
        )
        ray.get(extra.shutdown.remote())
        wait_until(
            lambda: _pool_ids(engine, 1), 30, "1 replica of group 1 in the pool", until=lambda n: n == 1
        )
        ray.kill(extra)
        assert engine.logits([[4, 5]])[0].shape == (2, 128)
        assert extra_id not in d.pool.replicas


def _pool_ids(engine, group: int) -> int:
    engine.logits([[1, 2]])  # a step refreshes the pool
    return len([r for r in engine.dispatcher.pool.replicas.values() if r.info["group"] == group])


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_generation_survives_killing_a_replica(ray_cluster, demo, how):
    prompts = [[5, 6, 7, 8], [100, 200], [9] * 12]
    with Engine.from_pretrained(demo) as local:
        want = local.generate(prompts, max_tokens=120, ignore_eos=True)
    with Engine.from_pretrained(demo, dispatcher="grpc", num_groups=2) as engine:
        victim = engine.dispatcher.actors[1]
        pid = ray.get(victim.describe.remote())["pid"]
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(out=engine.generate(prompts, max_tokens=120, ignore_eos=True))
        )
        calls_before = engine.dispatcher.stats()["calls"]
        worker.start()
        wait_until(
            lambda: engine.dispatcher.stats()["calls"],
            60,
            "the generation's first expert calls",
            until=lambda n: n > calls_before,
        )
        assert worker.is_alive(), "generation finished before the kill: make it longer"
        if how == "ray.kill":
            ray.kill(victim, no_restart=False)
        else:
            os.kill(pid, signal.SIGKILL)
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert engine.dispatcher.stats()["failovers"] >= 1
    assert result["out"] == want
