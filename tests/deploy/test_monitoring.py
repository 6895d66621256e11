"""Prometheus config, alert rules (and their promtool unit tests), Alertmanager config."""

from __future__ import annotations

import importlib.util
import re

import pytest
import yaml

from tests.deploy.helpers import REPO, promql_metric_names, run, tool, worker_metric_names

DEPLOY = REPO / "deploy"
RULE_FILES = sorted((DEPLOY / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((DEPLOY / "rules-tests").glob("*.test.yml"))
# Series Prometheus records itself (not exported by the worker) that rules may use.
PROMETHEUS_SERIES = {"up"}


def _rules() -> list[dict]:
    return [
        rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
    ]


def test_promtool_check_config():
    out = run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")])
    assert "SUCCESS" in out
    # The rule_files glob must pick up every rules file (and no test file).
    assert f"{len(RULE_FILES)} rule files found" in out


def test_promtool_check_rules():
    assert RULE_FILES
    run([tool("promtool"), "check", "rules", *map(str, RULE_FILES)])


def test_promtool_unit_tests():
    assert RULE_TESTS
    run([tool("promtool"), "test", "rules", *map(str, RULE_TESTS)], cwd=DEPLOY / "rules-tests")


def test_amtool_check_config():
    out = run([tool("amtool"), "check-config", str(DEPLOY / "alertmanager.yml")])
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test_and_metadata():
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested.update(t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts"))
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts - tested == set(), "alerts without a firing unit test"
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_pipeline_health_alerts_present():
    alerts = {r["alert"] for r in _rules()}
    # Dead letters, sink write errors, no scores, model staleness (+ worker down, latency, skew).
    assert {
        "IotadDeadLetterRateHigh",
        "IotadSinkWriteErrors",
        "IotadSinkDown",
        "IotadNoScores",
        "IotadModelStale",
    } <= alerts


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_rules_use_only_exported_metrics(rule):
    names = promql_metric_names(rule["expr"])
    assert names, rule["expr"]
    unknown = names - worker_metric_names() - PROMETHEUS_SERIES
    assert not unknown, f"{rule.get('alert')}: not exported by pipeline/metrics.py: {sorted(unknown)}"


def test_prometheus_scrapes_the_workers():
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    worker = jobs["iotad-worker"]  # the job label the rules and dashboards rely on
    (sd,) = worker["dns_sd_configs"]
    assert sd["port"] == 9464 and sd["names"] == ["iotad-workers"]
    assert any(re.search(r"alertmanager:9093", str(t)) for t in cfg["alerting"]["alertmanagers"])
    assert 'up{job="iotad-worker"}' in (DEPLOY / "rules" / "iotad.rules.yml").read_text()


def test_prometheus_scrapes_the_alerter():
    from pipeline.settings import Settings

    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    (static,) = jobs["iotad-alerter"]["static_configs"]  # the job label IotadAlerterDown selects
    assert static["targets"] == [f"alerter:{Settings.model_fields['alert_metrics_port'].default}"]
    alerter_down = next(r for r in _rules() if r.get("alert") == "IotadAlerterDown")
    assert 'up{job="iotad-alerter"} == 0' in alerter_down["expr"]
    assert alerter_down["labels"]["severity"] == "critical"


def test_alertmanager_secret_is_a_file():
    cfg = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    text = (DEPLOY / "alertmanager.yml").read_text()
    assert "hooks.slack.com" not in text and "api_url:" not in text, "webhook URL must not be committed"
    (receiver,) = cfg["receivers"]
    assert receiver["slack_configs"][0]["api_url_file"] == "/run/secrets/alert_webhook_url"


def test_prometheusrule_matches_rules_file():
    spec = importlib.util.spec_from_file_location("render_prometheusrule", DEPLOY / "render_prometheusrule.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = (REPO / "k8s" / "base" / "prometheusrule.yaml").read_text()
    assert committed == mod.render(), "k8s/base/prometheusrule.yaml is stale: python deploy/render_prometheusrule.py"
