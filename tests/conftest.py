"""Shared fixtures: one real SecantusDB for the session, real file servers,
and a running md5-light service. Nothing is mocked."""

from __future__ import annotations

import pytest

from fileserver import ThreadedServer
from servicectl import Service

from service.runtime.embedded_db import EmbeddedDatabase


@pytest.fixture(scope="session")
def mongo(tmp_path_factory):
    """mongodb://127.0.0.1:PORT (no database: each service picks its own)."""
    db = EmbeddedDatabase(str(tmp_path_factory.mktemp("secantus")))
    db.start()
    yield f"mongodb://127.0.0.1:{db.port}"
    db.stop()


@pytest.fixture(scope="session")
def files():
    return ThreadedServer().start()


@pytest.fixture(scope="session")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def service(mongo, logs):
    svc = Service(mongo, logs).start()
    yield svc
    svc.stop()


@pytest.fixture
def make_service(mongo, logs):
    """Start extra services with their own settings; stopped after the test."""
    started: list[Service] = []

    def make(start: bool = True, **env) -> Service:
        svc = Service(mongo, logs, **env)
        started.append(svc)
        return svc.start() if start else svc

    yield make
    for svc in started:
        try:
            svc.stop()
        except Exception:  # noqa: BLE001
            pass
