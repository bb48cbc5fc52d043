"""The alert rules and the Grafana dashboard in monitoring/: valid for promtool, their alerts fire as
their unit tests say, and every metric they name is one the daemon really serves on /metrics."""

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

from lssupervisor.daemon import metrics

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "lssupervisor.rules.yml"
RULE_TESTS = MONITORING / "lssupervisor.rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# Exported by the fleet view (issue 11: lssupervisor/daemon/fleetwatch.py, on its way from the s3
# branch). Not in lssupervisor/daemon/metrics.py here, so allowed by name; once that module is merged
# the test below checks the names against it.
FLEET_METRICS = {
    "lssupervisor_fleet_instances",
    "lssupervisor_fleet_stragglers",
    "lssupervisor_fleet_stale",
    "lssupervisor_fleet_last_refresh_timestamp_seconds",
}

# A status document with every key metrics.py reads, so that every metric family is exported.
FULL_SNAPSHOT: dict[str, Any] = {
    "state": "RUNNING",
    "substate": None,
    "paused": False,
    "target_version": 2,
    "lmdbs": {"main": {"path": "/x/db", "schema_version": 2}},
    "lightningstream": {
        "pid": 42, "ready": True, "restarts": 3, "failures_total": 1,
        "started_at": "2025-01-02T03:04:05.000Z",
    },
    "migration": {
        "last_duration_s": 1.5, "last_result": "ok", "last_success_at": "2025-01-02T03:04:00.000Z",
        "step": {"read": 100, "written": 50, "elapsed_s": 3.2, "index": 0, "steps": 2, "percent": 40.0},
    },
    "backups": {
        "count": 2,
        "last": {"id": "b", "created_at": "2025-01-02T03:03:00.000Z", "size_bytes": 4096, "version": 1},
    },
    "updated_at": "2025-01-02T03:04:05.000Z",
}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian: apt-get install prometheus)",
)


def exported() -> set[str]:
    """Every sample name /metrics serves, from the daemon's own collector and registry."""
    registry = metrics.build_registry(lambda: FULL_SNAPSHOT, lambda: 0.5)
    return {sample.name for family in registry.collect() for sample in family.samples}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (ours and the process collector's)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(?:lssupervisor|process)_[a-z0-9_]+\b", without_strings))


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard()["annotations"]["list"] if "expr" in a]
    return exprs


def test_the_full_snapshot_exports_every_family_metrics_py_declares() -> None:
    declared = set(re.findall(r'"(lssupervisor_[a-z_]+)"', Path(metrics.__file__).read_text()))
    families = {f.name for f in metrics.build_registry(lambda: FULL_SNAPSHOT, lambda: 0.5).collect()}
    assert declared <= families, declared - families


def test_rules_and_dashboard_name_only_metrics_the_daemon_exports() -> None:
    known = exported() | FLEET_METRICS
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"alert {rule['alert']}: {unknown} are not exported"
    for expr in dashboard_exprs():
        unknown = metric_names(expr) - known
        assert not unknown, f"dashboard query {expr!r}: {unknown} are not exported"


def test_the_fleet_allow_list_matches_the_fleet_module_once_it_is_there() -> None:
    fleetwatch = ROOT / "lssupervisor" / "daemon" / "fleetwatch.py"
    if not fleetwatch.exists():
        pytest.skip("the fleet view (issue 11) is not merged yet: its metric names are allowed by name")
    text = fleetwatch.read_text()
    assert all(f'"{name}"' in text for name in FLEET_METRICS)


def test_the_dashboard_shows_every_metric_the_daemon_exports() -> None:
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    ours = {n for n in exported() if n.startswith("lssupervisor_")}
    assert ours <= shown, f"not on the dashboard: {sorted(ours - shown)}"
    assert shown >= FLEET_METRICS


def test_the_dashboard_is_importable() -> None:
    d = dashboard()
    assert d["uid"] == "lssupervisor" and d["title"] == "lssupervisor"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for panel in d["panels"]:
        if panel["type"] in ("row", "alertlist"):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section_that_exists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["urls"]["Source"] + "/blob/main/docs/operations.md#"
    anchors = {
        re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.M)
    }
    text = OPERATIONS.read_text()
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        url = annotations["runbook_url"]
        assert url.startswith(base), url
        assert url.removeprefix(base) in anchors, f"{rule['alert']}: no section #{url.removeprefix(base)}"
        assert f"`{rule['alert']}`" in text, f"docs/operations.md does not describe {rule['alert']}"


def test_the_runbook_links_the_rules_and_the_dashboard() -> None:
    text = OPERATIONS.read_text()
    for path in (RULES, RULE_TESTS, DASHBOARD):
        assert f"../monitoring/{path.name}" in text, path.name


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    proc = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


@needs_promtool
def test_the_alerts_fire_as_their_unit_tests_say() -> None:
    proc = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=MONITORING, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules()}  # every alert has a unit test


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Grafana's variables replaced by values, each query becomes a recording rule: promtool parses it."""
    substitutions = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    records = []
    for i, query in enumerate(dashboard_exprs()):
        expr = query
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        records.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
