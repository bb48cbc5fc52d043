"""Credentials only where LS reads them (issue 13, rows 3 and 14), and never in what we show.

- a credential variable (by name, or because it is used in a storage credential key) expanded anywhere
  else in the LS template is refused by render and ``check``, naming the variable and the key;
- a secret whose value holds a newline, quote or backslash is refused naming the variable, never its
  value (LS pastes values into the YAML before parsing it: the secret it would use is another one);
- hook argv (and ``m.run`` tools, and LS's own argv) are redacted in logs like the status document.

What held stays held: no secret in the rendered file, /status, /metrics, /readyz or LS's argv.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from lssupervisor.cli.check import Level, run_checks
from lssupervisor.errors import TemplateError
from lssupervisor.lsconfig.render import Template, render
from lssupervisor.redaction import REDACTED, redact, redact_argv
from tests.harness import free_port
from tests.harness.e2e import WATCH, ConfigSet, Daemon, ship, step_migration, wait_running_on

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
S3 = """\
instance: node-1
lmdbs:
  main:
    path: /var/lib/app/db
    schema_tracks_changes: true
storage:
  type: s3
  options:
    access_key: ${{AWS_ACCESS_KEY_ID}}
    secret_key: "${{AWS_SECRET_ACCESS_KEY}}"
    bucket: {bucket}
    global_prefix: {prefix}
"""


def template(text: str) -> Template:
    return Template(
        path=Path("/etc/lssupervisor/lightningstream.yaml.in"), text=text, variable="APP_SCHEMA_VERSION"
    )


def env(**extra: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET, **extra}


def test_credentials_in_their_keys_render_and_stay_variables() -> None:
    rendered = render(template(S3.format(bucket="b", prefix="app/v${APP_SCHEMA_VERSION}/")), 3, env())
    assert "${AWS_SECRET_ACCESS_KEY}" in rendered.text and SECRET not in rendered.text
    assert "app/v3/" in rendered.text


def test_row3_a_secret_in_the_global_prefix_is_refused_naming_variable_and_key() -> None:
    text = S3.format(bucket="b", prefix='"app/${AWS_SECRET_ACCESS_KEY}/v${APP_SCHEMA_VERSION}/"')
    with pytest.raises(TemplateError) as info:
        render(template(text), 3, env())
    message = str(info.value)
    assert message.startswith(
        "/etc/lssupervisor/lightningstream.yaml.in:12: ${AWS_SECRET_ACCESS_KEY} is used in "
        "storage.options.global_prefix, but its name says it is a credential: LS would send it out"
    )
    assert "storage.options.access_key, storage.options.account_key, storage.options.secret_key" in message
    assert SECRET not in message


def test_a_variable_used_as_a_credential_is_a_credential_everywhere() -> None:
    """No tell-tale name: ${S3_KEY} is the secret_key, so it may not also name the bucket."""
    text = S3.replace("${{AWS_SECRET_ACCESS_KEY}}", "${{S3_KEY}}").format(
        bucket="${S3_KEY}", prefix="v${APP_SCHEMA_VERSION}/"
    )
    with pytest.raises(
        TemplateError,
        match=r":11: \$\{S3_KEY\} is used in storage.options.bucket, but it is "
        r"also used in storage.options.secret_key",
    ):
        render(template(text), 1, env(S3_KEY="k3y"))


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("instance: node-1", "instance: ${API_TOKEN}", "instance"),
        ("instance: node-1", "instance: node-1\nhttp:\n  address: ${DB_PASSWORD}", "http.address"),
        ("  main:", "  ${API_TOKEN}:", "lmdbs.${API_TOKEN}"),
    ],
)
def test_credential_names_are_refused_in_other_places(old: str, new: str, where: str) -> None:
    text = S3.format(bucket="b", prefix="v${APP_SCHEMA_VERSION}/").replace(old, new)
    with pytest.raises(
        TemplateError, match=rf"is used in {re.escape(where)}, but its name says it is a credential"
    ):
        render(template(text), 1, env(API_TOKEN="t0ken", DB_PASSWORD="pw"))


def test_a_credential_in_a_comment_is_harmless() -> None:
    text = "# rotate ${AWS_SECRET_ACCESS_KEY} yearly\n" + S3.format(
        bucket="b", prefix="v${APP_SCHEMA_VERSION}/"
    )
    render(template(text), 1, env())


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (SECRET[:20] + "\n" + SECRET[20:], "a line break"),
        (SECRET + '"', "a double quote"),
        (SECRET + "'", "a single quote"),
        (SECRET + "\\", "a backslash"),
    ],
)
def test_row14_a_secret_that_yaml_would_change_is_refused_without_showing_it(value: str, what: str) -> None:
    text = S3.format(bucket="b", prefix="v${APP_SCHEMA_VERSION}/")
    with pytest.raises(TemplateError) as info:
        render(template(text), 1, env(AWS_SECRET_ACCESS_KEY=value))
    message = str(info.value)
    assert f"${{AWS_SECRET_ACCESS_KEY}} in LS's environment contains {what}" in message
    assert "value not shown" in message
    assert SECRET[:12] not in message and SECRET[-12:] not in message


def test_a_newline_in_any_variable_is_refused() -> None:
    text = "instance: ${NODE}\n" + S3.format(bucket="b", prefix="v${APP_SCHEMA_VERSION}/").replace(
        "instance: node-1\n", ""
    )
    with pytest.raises(TemplateError, match=r"value of \$\{NODE\} in LS's environment contains a line break"):
        render(template(text), 1, env(NODE="a\nhttp:\n  address: 0.0.0.0:1"))


def test_check_reports_the_leak_as_an_error(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "lightningstream.yaml.in").write_text(
        S3.format(bucket="b", prefix='"app/${AWS_SECRET_ACCESS_KEY}/v${APP_SCHEMA_VERSION}/"')
    )
    cfg = tmp_path / "lssupervisor.yaml"
    cfg.write_text(f"state_dir: state\nlightningstream:\n  binary: {tmp_path / 'none'}\n  pdeathsig: false\n")
    report = run_checks(str(cfg), {**os.environ, **env()})
    errors = [f.message for f in report.findings if f.level is Level.ERROR]
    assert any("${AWS_SECRET_ACCESS_KEY} is used in storage.options.global_prefix" in e for e in errors), (
        errors
    )
    assert all(SECRET not in f.message for f in report.findings)


# ---------------------------------------------------------------------------------------------------
# Redaction in logs


def test_redact_argv_masks_options_assignments_urls_and_known_values() -> None:
    argv = [
        "notify",
        "--password=hunter2",
        "--api-token",
        "t0kenvalue",
        "AWS_SECRET_ACCESS_KEY=abc",
        "https://user:pa55@hooks.example/x",
        "--user",
        "bob",
        f"--header=X-Key: {SECRET}",
        "--access-key",
        "AK",
    ]
    assert redact_argv(argv, [SECRET]) == [
        "notify",
        f"--password={REDACTED}",
        "--api-token",
        REDACTED,
        f"AWS_SECRET_ACCESS_KEY={REDACTED}",
        f"https://{REDACTED}@hooks.example/x",
        "--user",
        "bob",
        f"--header=X-Key: {REDACTED}",
        "--access-key",
        REDACTED,
    ]
    # The status document masks every argv list the same way.
    assert redact({"hooks": [{"argv": ["x", "--token", "abc"]}]}) == {
        "hooks": [{"argv": ["x", "--token", REDACTED]}]
    }


def test_row14_hook_argv_is_redacted_in_the_daemon_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real daemon runs a pre_migrate hook whose argv carries secrets; its log shows none of them."""
    monkeypatch.setenv("HOOK_API_TOKEN", "env-token-0123456789")  # a credential of the daemon's environment
    cs = ConfigSet(tmp_path)
    port = free_port()
    hook = (
        "hooks:\n  pre_migrate:\n    - [sh, -c, 'exit 0', hook, --password=hunter2xyz, --token, tok3nvalue99,"
        " 'https://user:pa55word@hooks.example/x', env-token-0123456789]\n"
    )
    cs.write(extra=WATCH + hook, http=f"127.0.0.1:{port}")
    d = Daemon(cs)
    try:
        wait_running_on(d, 1)
        ship(cs, "0002_step.py", step_migration(2))
        wait_running_on(d, 2)
        started = d.wait_log(r"hook started")
        assert f"--password={REDACTED}" in started[0] and f"https://{REDACTED}@hooks.example/x" in started[0]
        log = d.text()
        for secret in ("hunter2xyz", "tok3nvalue99", "pa55word", "env-token-0123456789"):
            assert secret not in log, secret
        # What held: /status, /metrics and /readyz carry none either.
        for path in ("/status", "/metrics", "/readyz"):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()
            except urllib.error.HTTPError as exc:  # /readyz may answer 503
                body = exc.read().decode()
            assert all(s not in body for s in ("hunter2xyz", "tok3nvalue99", "pa55word")), path
        json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5).read())
    finally:
        d.close()
