"""A real PostgreSQL server for tests: the session fixtures ``postgres`` and ``postgres_url``.

``CXRGAZE_TEST_POSTGRES_URL`` (``postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB``) names a
server to use as it is. Otherwise a throwaway cluster is made and started:

1. ``initdb`` and ``pg_ctl`` are looked up on ``PATH``, then under
   ``/usr/lib/postgresql/<version>/bin`` (Debian's layout, newest version first).
2. Missing, and running as root with ``apt-get``: Debian's ``postgresql`` package is
   installed (``DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
   postgresql``, after ``apt-get update`` when the package lists lack it), saying so on the
   terminal. Where that is impossible (not root, no apt-get, the install fails) the tests
   that need the server are skipped, with the reason.
3. ``initdb`` into a temporary folder (as the package's ``postgres`` system user when we
   are root: PostgreSQL refuses to run as root), with one password-less superuser
   (``trust`` authentication, loopback only), started by ``pg_ctl`` on a free loopback
   port with its unix socket in the same folder and durability off (``fsync=off``: a
   test cluster).
4. At the end of the session the server is stopped (``immediate``; killed if that fails)
   and the folder deleted, also when tests failed or setup broke half-way.

Use: ``from postgres_fixture import postgres, postgres_url  # noqa: F401`` in a test module.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from apt import install_packages, tail
from conftest import free_port

ENV_URL = "CXRGAZE_TEST_POSTGRES_URL"
USER = "cxrgaze"
DATABASE = "cxrgaze"
SYSTEM_USER = "postgres"
"""The system user Debian's package creates; the cluster runs as it when we are root."""


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (the reason is the message)."""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (PATH first), or None."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        folder = Path(os.path.realpath(initdb)).parent
        if (folder / "pg_ctl").exists() and (folder / "postgres").exists():
            return folder
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if all(os.access(Path(folder) / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def install_postgresql(say) -> None:
    """Install Debian's ``postgresql`` package (root + apt-get only); raises :class:`PostgresUnavailable`."""
    install_packages(["postgresql"], "postgres", f"PostgreSQL (initdb, pg_ctl) is not installed and {ENV_URL} is not set",
                     PostgresUnavailable, say)


class Postgres:
    """A PostgreSQL server: its SQLAlchemy URL (``url``) and throwaway databases (:meth:`new_database`)."""

    def __init__(self, url: str, owned: bool) -> None:
        self.url = url
        self.owned = owned
        """Whether the fixture started this server (else it came from ``CXRGAZE_TEST_POSTGRES_URL``)."""
        self._created: list[str] = []

    def url_of(self, database: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    @contextmanager
    def _admin(self) -> Iterator:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()

    def new_database(self, prefix: str = "test") -> str:
        """Create an empty database (dropped at the end of the session); returns its URL.

        MLflow and Optuna both keep an ``alembic_version`` table, so each needs its own database.
        """
        import sqlalchemy

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        try:
            with self._admin() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if self.owned:
                raise
            pytest.skip(f"cannot create a database on {ENV_URL}'s server: {str(exc).splitlines()[0]}")
        self._created.append(name)
        return self.url_of(name)

    def drop_created(self) -> None:
        """Drop the databases :meth:`new_database` made (a failure is a warning: the tests are over)."""
        import warnings

        import sqlalchemy

        for name in self._created:
            try:
                with self._admin() as conn:
                    conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
            except sqlalchemy.exc.SQLAlchemyError as exc:
                warnings.warn(f"could not drop the test database {name}: {str(exc).splitlines()[0]}", stacklevel=1)
        self._created.clear()


class Cluster:
    """A throwaway cluster in a temporary folder, run by ``pg_ctl`` (see the module doc)."""

    def __init__(self, bindir: Path, say) -> None:
        self.bindir, self.say = bindir, say
        self.root = Path(tempfile.mkdtemp(prefix="cxrgaze-pg-"))  # not under pytest's 0700 folders: postgres must reach it
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = 0
        self.started = False
        self.run_as: str | None = None
        try:
            if os.geteuid() == 0:
                self.run_as = self._system_user()
                entry = pwd.getpwnam(self.run_as)
                os.chown(self.root, entry.pw_uid, entry.pw_gid)
            os.chmod(self.root, 0o700)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _system_user(self) -> str:
        try:
            pwd.getpwnam(SYSTEM_USER)
            return SYSTEM_USER
        except KeyError:
            pass
        name = "cxrgaze-pg"
        try:
            pwd.getpwnam(name)
        except KeyError:
            self.say(f"postgres fixture: no `{SYSTEM_USER}` user; creating the system user `{name}` to run the server")
            proc = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                   name], capture_output=True, text=True)
            if proc.returncode != 0:
                raise PostgresUnavailable(f"PostgreSQL refuses to run as root and `useradd {name}` failed: {tail(proc)}")
        return name

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a PostgreSQL program (as the system user when we are root)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        kwargs = {}
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.root)
        return subprocess.run([str(self.bindir / cmd[0]), *cmd[1:]], cwd=self.root, env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)

    def start(self) -> str:
        started = time.monotonic()
        proc = self._run("initdb", "--pgdata", str(self.data), "--username", USER, "--auth", "trust", "--encoding", "UTF8",
                         "--no-locale", "--no-sync")
        if proc.returncode != 0:
            raise PostgresUnavailable(f"initdb failed (exit {proc.returncode}): {tail(proc)}")
        for attempt in range(3):  # the free port may be taken in between
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            proc = self._run("pg_ctl", "--pgdata", str(self.data), "--log", str(self.log), "--wait", "--timeout", "60",
                             "-o", options, "start")
            if proc.returncode == 0:
                self.started = True
                break
            self._kill_leftover()
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "could not bind" not in log or attempt == 2:
                raise PostgresUnavailable(f"pg_ctl start failed (exit {proc.returncode}): {tail(proc)} "
                                          f"| server log: {' | '.join(log.strip().splitlines()[-5:])}")
        url = f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/postgres"
        server = Postgres(url, owned=True)
        import sqlalchemy

        with server._admin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{DATABASE}"'))
        version = self._run("postgres", "--version").stdout.strip()
        self.say(f"postgres fixture: {version} started on 127.0.0.1:{self.port} from {self.bindir} "
                 f"in {time.monotonic() - started:.1f} s (cluster {self.data}, as {self.run_as or 'this user'})")
        return server.url_of(DATABASE)

    def _kill_leftover(self) -> None:
        pidfile = self.data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    def stop(self) -> None:
        try:
            if self.started or (self.data / "postmaster.pid").exists():
                proc = self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "immediate", "--wait", "--timeout", "30",
                                 "stop", timeout=60)
                if proc.returncode != 0:
                    self._kill_leftover()
                    time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            self._kill_leftover()
        finally:
            self.started = False
            shutil.rmtree(self.root, ignore_errors=True)


def _sayer(config):
    """Print past pytest's output capture (an install is worth seeing while it happens)."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def say(message: str) -> None:
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(f"\n{message}", file=sys.stderr, flush=True)
        else:
            print(message, file=sys.stderr, flush=True)

    return say


@pytest.fixture(scope="session")
def postgres(request) -> Iterator[Postgres]:
    """A PostgreSQL server for the session (see the module doc); skips, with the reason, where none can run."""
    given = os.environ.get(ENV_URL)
    if given:
        server = Postgres(given, owned=False)
        try:
            yield server
        finally:
            server.drop_created()
        return
    say = _sayer(request.config)
    try:
        bindir = find_bindir()
        if bindir is None:
            install_postgresql(say)
            bindir = find_bindir()
            if bindir is None:
                raise PostgresUnavailable("apt-get installed postgresql but no initdb/pg_ctl is in PATH or "
                                          "/usr/lib/postgresql/*/bin")
        if not _psycopg2():
            raise PostgresUnavailable("psycopg2 is not importable (pip install psycopg2-binary)")
    except PostgresUnavailable as exc:
        say(f"postgres fixture: skipping: {exc}")
        pytest.skip(str(exc))
    try:
        cluster = Cluster(bindir, say)
    except (PostgresUnavailable, OSError, KeyError) as exc:
        say(f"postgres fixture: skipping: {exc}")
        pytest.skip(f"PostgreSQL could not start: {exc}")
    try:
        try:
            url = cluster.start()
        except (PostgresUnavailable, subprocess.SubprocessError, OSError) as exc:
            say(f"postgres fixture: skipping: {exc}")
            pytest.skip(f"PostgreSQL could not start: {exc}")
        server = Postgres(url, owned=True)
        yield server
    finally:
        cluster.stop()


def _psycopg2() -> bool:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_url(postgres: Postgres) -> str:
    """``postgresql+psycopg2://USER@127.0.0.1:PORT/DB`` of the session's server (Optuna's storage in the tests)."""
    return postgres.url
