from tests.unit.grpc_api.fixtures import backend, channel, loop, start, stub, tok  # noqa: F401
