"""Dockerfile and Kubernetes example: docker and a cluster are not available here, so these tests parse
the files and check that the numbers, paths and names agree with each other, with our config loader and
with the systemd unit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lssupervisor.config import HttpConfig, parse_address, parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "examples" / "kubernetes"
LS_MIRROR = Path("/work/.mirror/PowerDNS+lightningstream/repo")
ENTRYPOINT = ["lssupervisor", "run", "-c", "/etc/lssupervisor/lssupervisor.yaml"]

# Debian release each official powerdns/lightningstream image is built on (from LS's Dockerfile per
# tag). Our base image must use the same release so the copied binary runs and shares the libc.
LS_IMAGE_DEBIAN = {"0.4.4": "bookworm", "0.5.3": "bookworm", "0.6.0": "bookworm", "1.0.0": "trixie"}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for instr, args in dockerfile():
        if instr == "ARG" and "=" in args:
            k, _, v = args.partition("=")
            defaults[k] = v
    return defaults


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[doc["kind"]] = doc
    return docs


def sidecar(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "lssupervisor")


def test_dockerfile_stages_and_runtime_contract() -> None:
    instrs = dockerfile()
    args = arg_defaults()
    froms = [expand(a, args) for i, a in instrs if i == "FROM"]
    assert froms[0] == f"powerdns/lightningstream:{args['LIGHTNINGSTREAM_VERSION']} AS ls"
    assert all(f.startswith(f"python:3.11-slim-{args['DEBIAN_RELEASE']}") for f in froms[1:])
    copies = [a for i, a in instrs if i == "COPY"]
    assert "--from=ls /usr/local/bin/lightningstream /usr/local/bin/lightningstream" in copies
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [ENTRYPOINT]
    assert [a for i, a in instrs if i == "STOPSIGNAL"] == ["SIGTERM"]
    (health,) = [a for i, a in instrs if i == "HEALTHCHECK"]
    host, port = parse_address(HttpConfig().address, "default http.address")
    assert f"http://{host}:{port}/livez" in health
    (user,) = [expand(a, args) for i, a in instrs if i == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    run_lines = " ".join(a for i, a in instrs if i == "RUN")
    assert "util-linux" in run_lines  # setpriv --pdeathsig
    assert "ca-certificates" in run_lines  # LS speaks TLS to object storage


def test_dockerfile_base_matches_the_ls_image_release() -> None:
    args = arg_defaults()
    assert LS_IMAGE_DEBIAN[args["LIGHTNINGSTREAM_VERSION"]] == args["DEBIAN_RELEASE"]
    text = (ROOT / "Dockerfile").read_text()
    for version, release in LS_IMAGE_DEBIAN.items():
        if version in text:  # the comment table tells users which pair to build
            assert re.search(rf"{re.escape(version)}.*-> {release}|{release}.*{re.escape(version)}", text)


def test_ls_image_release_table_matches_ls_source() -> None:
    if shutil.which("git") is None or not LS_MIRROR.exists():
        pytest.skip("no Lightning Stream source mirror to compare the image table with")
    for version, release in LS_IMAGE_DEBIAN.items():
        text = subprocess.run(
            ["git", "-C", str(LS_MIRROR), "show", f"v{version}:Dockerfile"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
        final_from = [line for line in text.splitlines() if line.startswith("FROM")][-1]
        assert release in final_from, (version, final_from)


def test_dockerignore_admits_what_the_build_copies() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert lines[lines.index("*")] == "*"  # everything else stays out of the context
    for _, a in (x for x in dockerfile() if x[0] == "COPY" and "--from" not in x[1]):
        for src in a.split()[:-1]:
            assert src.rstrip("/") in allowed, src


def test_k8s_config_loads_with_our_loader(tmp_path: Path) -> None:
    docs = k8s_docs()
    data = docs["ConfigMap"]["data"]
    cfg = parse_config(data["lssupervisor.yaml"], "configmap lssupervisor.yaml", tmp_path)
    side = sidecar(docs)
    mounts = {m["mountPath"]: m for m in side["volumeMounts"]}
    (entry,) = [json.loads(a) for i, a in dockerfile() if i == "ENTRYPOINT"]
    config_dir = str(Path(entry[-1]).parent)
    assert mounts[config_dir]["readOnly"] is True
    assert Path(cfg.lightningstream.template) == Path(config_dir) / "lightningstream.yaml.in"
    assert str(cfg.state_dir) in mounts
    assert str(cfg.migrations.path) in mounts
    assert cfg.lightningstream.binary == "/usr/local/bin/lightningstream"  # where the Dockerfile puts it

    # Probes reach the address we listen on.
    host, port = parse_address(cfg.http.address, "http.address")
    assert host in ("0.0.0.0", "")  # the kubelet probes the pod IP, not loopback
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert side["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert side["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert ports[side[probe]["httpGet"]["port"]] == port

    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    ls = cfg.lightningstream
    assert pod["terminationGracePeriodSeconds"] >= ls.stop_timeout + ls.drain_timeout + 10
    unit = (ROOT / "systemd" / "lssupervisor.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M)
    assert stop is not None
    assert pod["terminationGracePeriodSeconds"] == int(stop.group(1))
    # PID clashes in LMDB's lock table: one namespace, or min_pid; exactly one of the two.
    assert pod.get("shareProcessNamespace", False) != (ls.min_pid > 0)


def test_k8s_template_variables_are_all_provided(tmp_path: Path) -> None:
    docs = k8s_docs()
    data = docs["ConfigMap"]["data"]
    cfg = parse_config(data["lssupervisor.yaml"], "configmap lssupervisor.yaml", tmp_path)
    template = data["lightningstream.yaml.in"]
    variables = set(re.findall(r"\$\{(\w+)\}", template))
    assert cfg.schema.variable in variables
    side = sidecar(docs)
    provided = {e["name"] for e in side.get("env", [])}
    secret_names = {s["secretRef"]["name"] for s in side.get("envFrom", [])}
    assert docs["Secret"]["metadata"]["name"] in secret_names
    provided |= set(docs["Secret"]["stringData"])
    assert variables - {cfg.schema.variable} <= provided
    rendered = yaml.safe_load(re.sub(r"\$\{(\w+)\}", "x", template))
    assert cfg.schema.variable and "${" + cfg.schema.variable + "}" in template.split("global_prefix:")[1]
    mounts = {m["mountPath"] for m in side["volumeMounts"]}
    for lmdb in rendered["lmdbs"].values():
        assert str(Path(lmdb["path"]).parent) in mounts
    containers = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    app = next(c for c in containers if c["name"] != "lssupervisor")
    assert mounts & {m["mountPath"] for m in app["volumeMounts"]}  # the shared LMDB volume


def test_k8s_runs_as_the_image_user() -> None:
    docs = k8s_docs()
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    args = arg_defaults()
    assert pod["securityContext"]["runAsUser"] == int(args["LSSUPERVISOR_UID"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = sidecar(docs)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    kustomize = docs["Kustomization"]
    assert sorted(kustomize["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
