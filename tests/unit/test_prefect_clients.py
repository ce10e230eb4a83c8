"""Prefect API clients of a process share one TLS context, built as Prefect builds its own."""

import ssl

from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.settings import (
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    temporary_settings,
)

import flows.common  # noqa: F401  (shares the context on import, as in a Dask worker)

API = "http://127.0.0.1:9/api"  # never contacted: clients connect lazily


def _context(client) -> ssl.SSLContext:
    return client._client._transport._pool._ssl_context


def test_clients_share_one_verified_context_instead_of_loading_the_bundle_each(monkeypatch):
    built = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(k) or real(*a, **k))
    clients = [PrefectClient(API) for _ in range(5)] + [SyncPrefectClient(API) for _ in range(5)]
    assert len({id(_context(c)) for c in clients}) == 1
    assert len(built) <= 1  # Prefect alone builds one per client: 10 here
    context = _context(clients[0])
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.get_ca_certs()  # certifi's bundle, as Prefect loads it


def test_the_settings_prefect_reads_still_decide_verification(tmp_path):
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        insecure = _context(PrefectClient(API))
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    import certifi

    bundle = tmp_path / "one.pem"
    bundle.write_text(certifi.contents().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    with temporary_settings({PREFECT_API_SSL_CERT_FILE: str(bundle)}):
        own = _context(SyncPrefectClient(API))
    assert len(own.get_ca_certs()) == 1 and own.verify_mode == ssl.CERT_REQUIRED
    # a caller's own context is kept
    mine = ssl.create_default_context()
    assert _context(PrefectClient(API, httpx_settings={"verify": mine})) is mine


def test_the_temporary_server_is_started_with_prefects_own_command_and_environment(monkeypatch):
    """We start Prefect's temporary server ourselves (without importing the server into the
    build's process): the command and environment must stay what Prefect's would be."""
    import subprocess

    from prefcurate.flows.common import TemporaryPrefectServer
    from prefect.server.api.server import SubprocessASGIServer

    launched = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, env: launched.append((args, env)))
    prefects = SubprocessASGIServer(port=8123)
    prefects._run_uvicorn_command()
    ours = TemporaryPrefectServer.__new__(TemporaryPrefectServer)  # (without launching it)
    ours.port = 8123
    (args, env), = launched
    assert ours.command() == args
    assert ours.environment() == env
    assert ours.api_url == prefects.api_url
