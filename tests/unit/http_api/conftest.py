from tests.unit.http_api.fixtures import auth_url, backend, http, tok, url  # noqa: F401
