"""Opening a database storage when the server has no free connection slot (many workers
starting at once: PostgreSQL's ``max_connections``, or a role's ``CONNECTION LIMIT``) waits
for one with back-off, as a storage call that loses its connection does, instead of failing
the worker; an address where no server answers still fails at once (tests/test_bad_input.py).
Real PostgreSQL: a role limited to two connections, both held by the test."""
from __future__ import annotations

import os
import threading
import time

import optuna
import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

from mnist_opt.errors import StorageError
from mnist_opt.tracking.storage import make_storage

pytestmark = pytest.mark.postgres


@pytest.fixture
def limited(postgres):
    """A database owned by a role that may hold two connections; its URL and the two held."""
    name = f"slots_{os.getpid()}"
    admin = sqlalchemy.create_engine(postgres["optuna"], poolclass=NullPool,
                                     isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 2"))
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name} OWNER {name}"))
    url = postgres["optuna"].replace("postgres@", f"{name}@").rsplit("/", 1)[0] + f"/{name}"
    holder = sqlalchemy.create_engine(url, poolclass=NullPool)
    held = [holder.connect(), holder.connect()]
    try:
        yield url, held
    finally:
        for conn in held:
            conn.close()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
            conn.execute(sqlalchemy.text(f"DROP ROLE {name}"))
        admin.dispose()


def test_opening_a_full_server_waits_for_a_free_slot(limited, capfd, monkeypatch):
    url, held = limited
    monkeypatch.setenv("MNIST_OPT_DB_RETRY", "60")
    freed = threading.Timer(3.0, lambda: [conn.close() for conn in held])
    start = time.monotonic()
    freed.start()
    try:
        storage = make_storage(url)
    finally:
        freed.join()
    waited = time.monotonic() - start
    study = optuna.create_study(study_name="opened", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2
    storage.engine.dispose()
    err = capfd.readouterr().err
    assert waited >= 2.5, (waited, err)
    assert "database unreachable" in err and "too many connections" in err, err
    assert "database reachable again" in err, err


def test_a_server_that_stays_full_fails_after_the_retry_limit(limited, monkeypatch):
    url, _ = limited
    monkeypatch.setenv("MNIST_OPT_DB_RETRY", "2")
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot open Optuna storage"):
        make_storage(url)
    assert 2 <= time.monotonic() - start < 30
