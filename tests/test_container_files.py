"""Dockerfile and Kubernetes example: docker and a cluster are not available here, so these tests parse
the files and check that the numbers, paths and names agree with each other, with our config loader and
with the systemd unit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from lssupervisor.config import Config, HttpConfig, parse_address, parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "examples" / "kubernetes"
LS_MIRROR = Path("/work/.mirror/PowerDNS+lightningstream/repo")
ENTRYPOINT = ["lssupervisor", "run", "-c", "/etc/lssupervisor/lssupervisor.yaml"]
# What statefulset.yaml's comment gives the application container to stop before the sidecar's turn.
APP_STOP_ALLOWANCE = 30

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
    """The lssupervisor container: a native sidecar (an init container that keeps running)."""
    inits = docs["StatefulSet"]["spec"]["template"]["spec"]["initContainers"]
    return next(c for c in inits if c["name"] == "lssupervisor")


def example_config(docs: dict[str, dict[str, Any]], tmp_path: Path) -> Config:
    text = docs["ConfigMap"]["data"]["lssupervisor.yaml"]
    return parse_config(text, "configmap lssupervisor.yaml", tmp_path)


def seconds_of(probe: dict[str, Any]) -> int:
    """How long a probe may keep failing before the kubelet acts."""
    return int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))


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
    # The application stops first (main container), then the sidecar: the grace period is shared.
    sidecar_budget = pod["terminationGracePeriodSeconds"] - APP_STOP_ALLOWANCE
    assert sidecar_budget >= ls.stop_timeout + ls.drain_timeout + 10
    unit = (ROOT / "systemd" / "lssupervisor.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M)
    assert stop is not None
    assert sidecar_budget == int(stop.group(1))  # the same stop budget as under systemd
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
    (app,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
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


# ---------------------------------------------------------------------------------------------------
# Kubernetes: native sidecar, startup probe, disruption budget, LS's metrics


def test_k8s_lssupervisor_is_a_native_sidecar_started_after_the_migrations_copy() -> None:
    pod = k8s_docs()["StatefulSet"]["spec"]["template"]["spec"]
    names = [c["name"] for c in pod["initContainers"]]
    assert names == ["migrations", "lssupervisor"]  # the files are in place before it starts
    assert sidecar(k8s_docs())["restartPolicy"] == "Always"  # native sidecar (Kubernetes >= 1.29)
    assert "restartPolicy" not in pod["initContainers"][0]  # the copy runs once, to completion
    assert all(c["name"] != "lssupervisor" for c in pod["containers"])


def test_k8s_startup_probe_outlasts_every_deadline_of_a_start(tmp_path: Path) -> None:
    """The application starts once the sidecar's startupProbe passes (the LMDB migrated, LS synced).
    Its budget must cover lssupervisor's own deadlines for a start, so those fire first and the kubelet
    never kills a start (and its migration) that is on time."""
    docs = k8s_docs()
    cfg = example_config(docs, tmp_path)
    side = sidecar(docs)
    startup = side["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "lssup-http"}
    ls, migs = cfg.lightningstream, cfg.migrations
    assert migs.timeout is not None, "set migrations.timeout: without it a start has no overall deadline"
    deadlines = migs.import_timeout + ls.drain_timeout + ls.stop_timeout + migs.timeout + ls.ready_timeout
    assert seconds_of(startup) >= deadlines
    # ...and liveness gives a stuck main loop no such budget.
    assert seconds_of(side["livenessProbe"]) <= 60 and side["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_k8s_disruption_budget_takes_one_pod_at_a_time() -> None:
    docs = k8s_docs()
    pdb = docs["PodDisruptionBudget"]
    sts = docs["StatefulSet"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1 < sts["spec"]["replicas"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_exposes_lightningstreams_own_metrics(tmp_path: Path) -> None:
    docs = k8s_docs()
    template = docs["ConfigMap"]["data"]["lightningstream.yaml.in"]
    address = yaml.safe_load(re.sub(r"\$\{(\w+)\}", "x", template))["http"]["address"]
    host, _, port = address.rpartition(":")
    assert host in ("", "0.0.0.0", "[::]"), "LS's metrics must listen on the pod IP, not loopback"
    ports = {p["name"]: p["containerPort"] for p in sidecar(docs)["ports"]}
    assert ports["ls-http"] == int(port)
    monitor = yaml.safe_load((K8S / "monitoring" / "podmonitor.yaml").read_text())
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped == {"lssup-http", "ls-http"} and scraped <= set(ports)
    labels = docs["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_example_builds_with_kustomize() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: cannot run `kubectl kustomize`")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(out))
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Secret", "Service", "StatefulSet"]


def test_kubernetes_doc_explains_the_grace_period_and_startup_budget() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    pod = k8s_docs()["StatefulSet"]["spec"]["template"]["spec"]
    assert f"terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}" in text
    for words in ("stop_timeout", "step_timeout", "native sidecar", "startupProbe", "PodDisruptionBudget"):
        assert words in text, words


# ---------------------------------------------------------------------------------------------------
# The image installs pinned versions (requirements.lock, `make lock`)


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (ROOT / "requirements.lock").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"requirements.lock: not a name==version pin: {line!r}"
        pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> set[str]:
    """lssupervisor's runtime dependencies and theirs, as installed here."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r).name for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_the_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    from packaging.requirements import Requirement

    pins = lock_pins()
    assert runtime_closure() <= set(pins)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for text in project["project"]["dependencies"]:
        req = Requirement(text)
        assert req.specifier.contains(pins[canonical(req.name)]), (text, pins[canonical(req.name)])
    # The build backend too: the image builds lssupervisor with the pinned setuptools.
    backend = Requirement(project["build-system"]["requires"][0])
    assert backend.name == "setuptools" and backend.specifier.contains(pins["setuptools"])


def test_the_dockerfile_installs_only_pinned_versions() -> None:
    runs = [a for i, a in dockerfile() if i == "RUN" and "pip install" in a]
    assert runs, "no pip install in the Dockerfile"
    for run in runs:
        for command in re.split(r"&&", run):
            if "pip install" in command:
                assert "--constraint /src/requirements.lock" in command, command
    assert any("--no-build-isolation" in run for run in runs)  # no unpinned build backend is fetched
    copies = [a for i, a in dockerfile() if i == "COPY"]
    assert "requirements.lock /src/" in copies
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^lock:", makefile, re.M) and "pip freeze" in makefile
