"""The gpu overlay's exact serveConfigV2 (tiny model and free ports swapped in), deployed through Serve's
config path (what `serve deploy` and KubeRay do), answers a gRPC Generate."""

import socket

import grpc
import pytest

from tests.k8s.validators import one, serve_config
from tests.waiting import wait_until

# --- 7. the gpu overlay's serveConfigV2 on a Ray cluster ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpu_serve_config_deploys_and_answers_grpc_generate(built, ray_cluster, tmp_path):
    """The exact serveConfigV2 of the gpu overlay (model path and ports swapped) goes through Serve's config
    path, as `serve deploy` / KubeRay: ServeDeploySchema, serve_start with its proxy and HTTP options, then
    deploy_apps (the builder runs in a Ray task, the listed options override). 4 groups x 1 GPU each = the
    session cluster's 4 logical GPUs; 2 routers x 1 CPU."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from emoe.client import InferenceClient
    from emoe.demo import write_demo_model

    cfg = serve_config(one(built["gpu"], "RayService"))
    (app,) = cfg["applications"]
    http_port, grpc_port = free_port(), free_port()
    cfg["http_options"].update(port=http_port, host="127.0.0.1")  # this machine: loopback only
    app["args"].update(
        model=str(write_demo_model(tmp_path / "model")),
        grpc_port=grpc_port,
        http_port=http_port,
        host="127.0.0.1",
        data_plane_host="127.0.0.1",
    )
    # on Kubernetes the head container gets these from the Secret emoe-api-tokens; here the app's runtime_env
    tokens = {app["args"]["api_token_env"]: "api-s3cret", app["args"]["admin_token_env"]: "adm1n"}
    app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(tokens)
    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    try:
        client.deploy_apps(schema)
        wait_running(app["name"], timeout_s=120)
        with InferenceClient(f"127.0.0.1:{grpc_port}", timeout_s=60) as c:
            with pytest.raises(grpc.RpcError) as denied:
                c.complete("Once upon a time", max_tokens=2)
            assert (
                denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            )  # the token from the env is enforced
        with InferenceClient(f"127.0.0.1:{grpc_port}", timeout_s=60, token="api-s3cret") as c:
            parts = list(c.generate("Once upon a time", max_tokens=8, ignore_eos=True))
        assert len([t for p in parts for t in p.token_ids]) == 8
        assert parts[-1].finish_reason == "length"

        details = client.get_serve_details()["applications"][app["name"]]["deployments"]
        head = ray_cluster.head_node.node_id
        assert [r["node_id"] for r in details["Frontend"]["replicas"]] == [head]
        assert len(details["Router"]["replicas"]) == app["args"]["routers"]
        for g in range(app["args"]["groups"]):
            assert len(details[f"ExpertGroup-{g}"]["replicas"]) == 1
            deployed = details[f"ExpertGroup-{g}"]["deployment_config"]
            assert deployed["autoscaling_config"]["max_replicas"] == app["args"]["max_replicas_per_group"]
            assert deployed["ray_actor_options"]["num_gpus"] == app["args"]["gpus_per_expert_replica"]
    finally:
        serve.delete(app["name"])
        serve.shutdown()


def wait_running(app_name: str, timeout_s: float) -> None:
    from ray import serve

    def state() -> tuple[str, str]:
        status = serve.status().applications.get(app_name)
        state, message = (status.status, status.message) if status else ("NOT_STARTED", "")
        if state == "DEPLOY_FAILED":
            pytest.fail(f"application {app_name}: {state}: {message}")
        return state, message

    wait_until(
        state, timeout_s, f"application {app_name} RUNNING", until=lambda s: s[0] == "RUNNING", interval_s=0.5
    )
