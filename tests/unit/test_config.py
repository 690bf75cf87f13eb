import pytest

from cluster.app import build_app  # noqa: F401 - the import path Serve and KubeRay use must import
from cluster.config import AppConfig, ConfigError, load_config, parse_config


def test_defaults_and_yaml_with_flag_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("groups: 4\ntransport: dist\nmax_queue: 10\napi_token: s3cret\n")
    cfg = load_config(f, groups=3, http_port=None)
    assert (cfg.groups, cfg.transport, cfg.max_queue, cfg.http_port) == (3, "dist", 10, 8000)
    assert "s3cret" not in repr(cfg) and cfg.to_args()["api_token"] == "s3cret"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"groups": 0}, "groups"),
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"grpc_port": 70000}, "grpc_port"),
        ({"dtype": "int4"}, "dtype"),
        ({"gruops": 2}, "gruops"),
        ({"tls_cert_file": "a.pem"}, "tls_cert_file"),
    ],
)
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        parse_config(data)


def test_unreadable_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(f)


def test_local_serve_gives_the_router_one_thread_unless_configured():
    from cli.serve_cmd import one_machine_threads

    assert one_machine_threads(AppConfig(model="m", transport="grpc")).router_torch_threads == 1
    assert (
        one_machine_threads(
            AppConfig(model="m", transport="grpc", router_torch_threads=3)
        ).router_torch_threads
        == 3
    )
    assert one_machine_threads(AppConfig(model="m", transport="local")).router_torch_threads == 0


def test_generation_config_auto_reads_the_release_defaults_and_ignore_drops_them(tmp_path):
    from cluster.router_server import sampling_defaults

    (tmp_path / "generation_config.json").write_text(
        '{"eos_token_id": 2, "do_sample": true, "temperature": 1.0, "top_p": 0.95, "top_k": 40}'
    )
    auto = parse_config({"model": str(tmp_path)})
    assert auto.generation_config == "auto"
    assert dict(sampling_defaults(auto)) == {"temperature": 1.0, "top_p": 0.95, "top_k": 40}
    assert sampling_defaults(parse_config({"model": str(tmp_path), "generation_config": "ignore"})) == ()
    with pytest.raises(ConfigError, match="generation_config"):
        parse_config({"model": str(tmp_path), "generation_config": "vllm"})
