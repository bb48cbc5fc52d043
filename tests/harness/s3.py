"""A bucket on the test session's S3 server (the ``s3_bucket`` fixture of tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lssupervisor.testing.s3server import S3Server


@dataclass(frozen=True)
class Bucket:
    """A fresh bucket on the session's S3 server, and the credentials LS gets from its environment."""

    server: S3Server
    name: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def environ(self) -> dict[str, str]:
        return self.server.environ()

    def keys(self, prefix: str = "") -> list[str]:
        s3 = self.server.s3()
        out: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def storage_options(self, global_prefix: str) -> str:
        """The LS ``storage:`` block (credentials as references LS expands)."""
        return (
            "storage:\n  type: s3\n  options:\n"
            f"    bucket: {self.name}\n"
            f"    endpoint_url: {self.endpoint}\n"
            f'    global_prefix: "{global_prefix}"\n'
            '    access_key: "${AWS_ACCESS_KEY_ID}"\n'
            '    secret_key: "${AWS_SECRET_ACCESS_KEY}"\n'
        )
