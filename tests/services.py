"""Real servers for the team-services tests: a throwaway PostgreSQL cluster set up by the same
init script as infra/compose.yaml, and an S3-compatible server (moto) standing in for MinIO.

CI installs Debian's postgresql (.ci/run) and sets BRAINLM_REQUIRE_SERVICES=1, so a missing
server fails there; on a workstation without PostgreSQL these tests are skipped with the reason.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INIT_ROLES = REPO / "infra" / "postgres" / "init-roles.sh"
SERVICES = ("mlflow", "optuna", "prefect")


def missing(what: str) -> None:
    """Skip, or fail where CI promised the service (BRAINLM_REQUIRE_SERVICES=1)."""
    if os.environ.get("BRAINLM_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} (BRAINLM_REQUIRE_SERVICES=1: CI must provide it)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120,
                  log: Path | None = None) -> None:
    """Poll `url` until it answers (any HTTP status), the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n"
                               f"{_tail(log)}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{_tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    """End a server started with start_new_session=True and every process of its group, even
    when the leader has already exited."""
    for sig, wait in ((15, 20), (9, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the whole group is gone
        try:
            proc.wait(timeout=wait)
            if sig == 15:
                time.sleep(0.2)  # children get a moment after their leader
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path | None, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log is not None and log.exists() else ""


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class Postgres:
    """A private cluster on 127.0.0.1:`port` with the service roles of infra/postgres."""

    bindir: Path
    root: Path
    port: int
    passwords: dict = field(default_factory=dict)

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, role: str, database: str | None = None, driver: str = "postgresql") -> str:
        return (f"{driver}://{role}:{self.passwords[role]}@127.0.0.1:{self.port}/"
                f"{database or role}")

    def psql(self, sql: str, role: str = "postgres", database: str = "postgres",
             check: bool = True) -> subprocess.CompletedProcess:
        """Run `sql` over TCP as `role` (password auth for the service roles)."""
        env = {**os.environ, "PGPASSWORD": self.passwords.get(role, ""), "PGCONNECT_TIMEOUT": "5"}
        host = str(self.socket_dir) if role == "postgres" else "127.0.0.1"
        return subprocess.run([str(self.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At",
                               "-h", host, "-p", str(self.port), "-U", role, "-d", database,
                               "-c", sql], env=env, capture_output=True, text=True, check=check)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: CI runs as root, so run its programs as `postgres`."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def start_postgres():
    """Yield a running Postgres; stop it and remove its files afterwards."""
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        missing("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    # not under pytest's tmp dir: root's is 0700, which the postgres user cannot enter
    root = Path(tempfile.mkdtemp(prefix="brainlm-pg-"))
    (root / "socket").mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "socket", "postgres")
    data, log, port = root / "data", root / "server.log", free_port()
    pg = Postgres(bindir, root, port, {s: secrets.token_urlsafe(16) for s in SERVICES})
    try:
        subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U",
                                          "postgres", "--auth-local=trust",
                                          "--auth-host=scram-sha-256", "-E", "UTF8",
                                          "--no-instructions"]),
                       check=True, capture_output=True, text=True)
        subprocess.run(_as_postgres_user([
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-p {port} -k {root / 'socket'} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200", "start"]),
            check=True, capture_output=True, text=True)
        env = {**os.environ, "PGHOST": str(root / "socket"), "PGPORT": str(port),
               "POSTGRES_USER": "postgres", "POSTGRES_DB": "postgres",
               **{f"{s.upper()}_DB_PASSWORD": pw for s, pw in pg.passwords.items()}}
        done = subprocess.run(["sh", str(INIT_ROLES)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr + done.stdout
        yield pg
    finally:
        subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                          "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class S3:
    """An S3 API on 127.0.0.1 (moto's server): the MinIO stand-in."""

    endpoint: str
    access_key: str = "testing-access"
    secret_key: str = "testing-secret"

    @property
    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def start_s3(tmp: Path):
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        missing("moto_server is not installed (pip install 'moto[server]')")
    port, log = free_port(), tmp / "moto.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/moto-api/", proc, timeout=60, log=log)
        yield S3(f"http://127.0.0.1:{port}")
    finally:
        stop(proc)
