"""A real S3-API server on loopback for tests and the demo: moto's server mode (``pip install
'moto[server]'``, a dev dependency), run as a child process.

The server checks signatures and IAM policies (``INITIAL_NO_AUTH_ACTION_COUNT``): the first three
requests create an admin user, its key and an allow-all policy; every request after that must be
signed with a key the server knows, so wrong credentials fail as they do on AWS. More users with
narrower policies come from :meth:`S3Server.user` (what each lssupervisor command needs).

    with S3Server.start() as s3:
        s3.create_bucket("fleet")
        env = s3.environ()   # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for LS's ${...} references

State lives in the server's memory: stopping it forgets every bucket.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from lssupervisor.testing.ports import free_port

_BOOTSTRAP_ACTIONS = 3  # CreateUser, CreateAccessKey, PutUserPolicy
REGION = "us-east-1"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def available() -> bool:
    """Whether moto's server (and boto3, which it brings) is installed."""
    return importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]
    access_key: str = ""
    secret_key: str = field(default="", repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int | None = None, timeout: float = 60.0) -> S3Server:
        if not available():
            raise RuntimeError("moto's server is not installed: pip install 'moto[server]'")
        port = free_port() if port is None else port
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_BOOTSTRAP_ACTIONS))
        # A file, not a pipe: the server logs every request, and an undrained pipe would block it.
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        server = cls(proc, port, log)
        try:
            server._wait_up(timeout)
            server._bootstrap()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {err[-500:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server on port {self.port} did not answer within {timeout}s")
            time.sleep(0.05)  # polling a condition with a deadline

    def _client(self, service: str, access_key: str = "bootstrap", secret_key: str = "bootstrap") -> Any:
        import boto3

        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        )

    def _bootstrap(self) -> None:
        iam = self._client("iam")
        iam.create_user(UserName="admin")
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    # -- administration (as the admin user) --------------------------------------------------------

    def iam(self) -> Any:
        return self._client("iam", self.access_key, self.secret_key)

    def s3(self) -> Any:
        return self._client("s3", self.access_key, self.secret_key)

    def create_bucket(self, name: str) -> None:
        self.s3().create_bucket(Bucket=name)

    def user(self, name: str, policy: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """A new user with ``policy`` (default: allow all); returns its (access key, secret)."""
        iam = self.iam()
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy or ALLOW_ALL))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def revoke(self, user: str, access_key: str) -> None:
        """Delete ``user``'s key: from now on every request signed with it is refused."""
        self.iam().delete_access_key(UserName=user, AccessKeyId=access_key)

    def environ(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": access_key or self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(port: int | None = None) -> Iterator[S3Server]:
    server = S3Server.start(port)
    try:
        yield server
    finally:
        server.stop()
