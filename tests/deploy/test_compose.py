"""docker-compose.yml: schema, `docker compose config` with .env.example, and what the stack must contain."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.settings import Settings
from tests.deploy.helpers import REPO, clean_env, run, tool

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|WEBHOOK|API_KEY|_KEY$", re.I)


def _compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --env-file replaces the project's .env, so a developer's own .env cannot change the result.
    cmd = [tool("docker-compose"), "-f", str(COMPOSE), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60)


def _ok(proc: subprocess.CompletedProcess[str]) -> bool:
    # docker compose 2.40 prints interpolation errors (e.g. a missing required variable) but still
    # exits 0: a clean run has rc 0 AND no error on stderr.
    return proc.returncode == 0 and "error" not in proc.stderr.lower()


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / ".env"
    shutil.copy(ENV_EXAMPLE, path)
    return path


@pytest.fixture(scope="module")
def config(env_file: Path) -> dict:
    """The fully resolved project (all profiles), as docker compose sees it."""
    proc = _compose(env_file, "--profile", "gpu", "config", "--format", "json")
    assert _ok(proc), proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_spec_schema():
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["cpu", "gpu"])
def test_docker_compose_config(env_file, profile):
    proc = _compose(env_file, *profile, "config", "-q")
    assert _ok(proc), proc.stderr


def test_secrets_are_required_not_defaulted(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = _compose(empty, "config", "-q")
    assert not _ok(proc)
    # docker compose reports one missing variable, whichever it meets first (map order varies).
    assert re.search(r"required variable [A-Z0-9_]+ is missing a value", proc.stderr), proc.stderr
    # So each required variable on its own: .env.example without it fails, naming it.
    required = sorted(set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text())))
    assert "INFLUX_TOKEN" in required
    lines = ENV_EXAMPLE.read_text().splitlines()
    for name in required:
        env = tmp_path / f"{name}.env"
        env.write_text("".join(f"{line}\n" for line in lines if not line.startswith(f"{name}=")))
        proc = _compose(env, "config", "-q")
        assert not _ok(proc) and f"required variable {name} is missing a value" in proc.stderr, name


def test_no_secret_values_in_compose_file(raw):
    text = COMPOSE.read_text()
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value and value not in text, f"{key}'s value appears in docker-compose.yml"

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and SECRET_NAME.search(str(k)) and not str(k).endswith("__FILE"):
                    assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", v), f"{path}.{k} must be ${{VAR:?...}}"
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(raw, "")
    for name, secret in raw["secrets"].items():
        assert set(secret) == {"environment"}, f"secret {name} must come from the environment (.env)"


def test_env_example_documents_every_variable():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    documented = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert used - documented == set(), "variables used in docker-compose.yml but not in .env.example"
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    assert {"INFLUX_TOKEN", "INFLUX_ADMIN_PASSWORD", "INFLUX_GRAFANA_PASSWORD"} <= required


def test_images_are_pinned(config):
    for name, svc in config["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: {image} is not pinned"
        if not repo.startswith("iotad"):
            assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a full version, not {tag}"
    images = {name: svc["image"] for name, svc in config["services"].items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["influxdb"].startswith("influxdb:2.")
    assert images["grafana"].startswith("grafana/grafana:")
    assert images["prometheus"].startswith("prom/prometheus:")
    assert images["alertmanager"].startswith("prom/alertmanager:")


def test_kafka_runs_in_kraft_mode(config):
    env = config["services"]["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env and "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert not any("zookeeper" in name for name in config["services"])
    init = config["services"]["kafka-init"]
    assert "--partitions" in " ".join(init["command"]) and init["restart"] == "no"


def test_influxdb_init_creates_org_bucket_token_and_dbrp(config):
    svc = config["services"]["influxdb"]
    env = svc["environment"]
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    for key in ("ORG", "BUCKET", "ADMIN_TOKEN", "USERNAME", "PASSWORD"):
        assert env[f"DOCKER_INFLUXDB_INIT_{key}"], key
    mounts = {m["target"]: m for m in svc["volumes"]}
    init_dir = Path(mounts["/docker-entrypoint-initdb.d"]["source"])
    scripts = sorted(init_dir.glob("*.sh"))
    assert scripts and all(p.stat().st_mode & 0o111 for p in scripts), "init scripts must be executable"
    text = "".join(p.read_text() for p in scripts)
    assert "influx v1 dbrp create" in text and "--rp autogen" in text
    subprocess.run(["bash", "-n", *map(str, scripts)], check=True)


def test_healthchecks_and_startup_order(config):
    services = config["services"]
    for name in ("kafka", "influxdb", "prometheus", "alertmanager", "grafana", "worker", "worker-gpu", "alerter"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ("worker", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert deps["kafka-init"]["condition"] == "service_completed_successfully"
        assert deps["influxdb"]["condition"] == "service_healthy"
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["simulator"]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert services["grafana"]["depends_on"]["influxdb"]["condition"] == "service_healthy"
    assert services["alerter"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "worker-gpu", "retrain"):
        assert services[name]["depends_on"]["registry-init"]["condition"] == "service_completed_successfully", name
    for svc in services.values():
        for dep in svc.get("depends_on", {}).values():
            assert dep["condition"] in {"service_healthy", "service_completed_successfully", "service_started"}


def test_worker_settings(config):
    fields = set(Settings.model_fields)
    for name in ("worker", "worker-gpu", "simulator", "retrain", "alerter"):
        env = config["services"][name]["environment"]
        for key in env:
            if key.startswith("IOTAD_"):
                assert key.removeprefix("IOTAD_").lower() in fields, f"{name}: {key} is not a setting"
    cpu = config["services"]["worker"]
    gpu = config["services"]["worker-gpu"]
    for svc, device in ((cpu, "cpu"), (gpu, "cuda")):
        env = svc["environment"]
        assert svc["command"] == ["worker"]
        assert env["IOTAD_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["IOTAD_INFLUX_URL"] == "http://influxdb:8086"
        assert env["IOTAD_INFLUX_VERSION"] == "2"
        assert env["IOTAD_INFLUX_ORG"] and env["IOTAD_INFLUX_DATABASE"] and env["IOTAD_INFLUX_TOKEN"]
        assert env["IOTAD_METRICS_HOST"] == "0.0.0.0" and env["IOTAD_METRICS_PORT"] == "9464"
        assert env["IOTAD_DEVICE"] == device
        assert "iotad-workers" in svc["networks"]["default"]["aliases"]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]
    (device_req,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device_req["driver"] == "nvidia" and "gpu" in device_req["capabilities"]
    assert config["services"]["simulator"]["command"][0] == "simulate"
    assert config["services"]["retrain"]["command"] == ["retrain", "--loop"]


def test_workers_and_retrain_share_one_registry(config):
    """`retrain` promotes into the registry the workers load the champion from: one volume, one URL."""
    services = config["services"]
    urls = {
        name: services[name]["environment"].get("IOTAD_REGISTRY_URL") for name in ("worker", "worker-gpu", "retrain")
    }
    assert len(set(urls.values())) == 1 and None not in urls.values(), urls
    url = urls["retrain"]
    assert url.startswith("/"), "a local registry path inside the shared volume"
    sources = {}
    for name in urls:
        vols = [v for v in services[name]["volumes"] if v["type"] == "volume" and url.startswith(v["target"])]
        assert len(vols) == 1, f"{name}: no volume holds {url}"
        (vol,) = vols
        assert vol["source"] in config["volumes"], name
        sources[name] = (vol["source"], vol["target"])
        # The retraining job is the registry's single writer; the workers only read it.
        assert bool(vol.get("read_only")) == (name != "retrain"), name
    assert len(set(sources.values())) == 1, sources
    assert services["retrain"].get("deploy", {}).get("replicas", 1) == 1
    init = services["registry-init"]
    assert any(v["type"] == "volume" and v["source"] == sources["retrain"][0] for v in init["volumes"])


def test_alerter(config):
    from connectors.alert_delivery import load_router

    alerter = config["services"]["alerter"]
    env = alerter["environment"]
    assert alerter["command"] == ["alerter"]
    port = env["IOTAD_ALERT_METRICS_PORT"]
    assert port == str(Settings.model_fields["alert_metrics_port"].default)
    assert env["IOTAD_METRICS_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{port}/metrics" in " ".join(alerter["healthcheck"]["test"])
    assert alerter["read_only"] is True and alerter["cap_drop"] == ["ALL"]
    # One alerter: the storm guard must see the whole fleet.
    assert alerter.get("deploy", {}).get("replicas", 1) == 1
    assert "iotad-workers" not in str(alerter.get("networks", {})), "not scraped as a worker"
    # The routes file is mounted from the example, and loads with the secrets .env.example provides.
    mounts = {v["target"]: Path(v["source"]) for v in alerter["volumes"] if v["type"] == "bind"}
    routes = mounts[env["IOTAD_ALERT_ROUTES"]]
    assert routes == REPO / "deploy" / "alerting" / "routes.example.yml"
    text = routes.read_text()
    assert "hooks.slack.com" not in text and not re.search(r"^\s*(secret|routing_key):", text, re.M)
    router = load_router(routes, env)
    kinds = {type(r).__name__ for r in router.receivers.values()}
    assert {"WebhookReceiver", "SlackReceiver", "AlertmanagerReceiver"} <= kinds
    am = next(r for r in router.receivers.values() if type(r).__name__ == "AlertmanagerReceiver")
    assert "http://alertmanager:9093" in repr(vars(am))
    # Every `*_env` the routes file names is set on the alerter from .env (never a literal value).
    raw = yaml.safe_load(COMPOSE.read_text())["services"]["alerter"]["environment"]
    for name in re.findall(r"^\s*\w+_env:\s*(\w+)", text, re.M):
        assert re.fullmatch(r"\$\{" + name + r":\?[^}]*\}", raw[name]), name


def test_volumes_and_mounts(config):
    named = set(config["volumes"])
    for svc, target in (
        ("kafka", "/var/lib/kafka/data"),
        ("influxdb", "/var/lib/influxdb2"),
        ("grafana", "/var/lib/grafana"),
        ("prometheus", "/prometheus"),
        ("alertmanager", "/alertmanager"),
    ):
        vols = {v["target"]: v for v in config["services"][svc]["volumes"]}
        assert vols[target]["type"] == "volume" and vols[target]["source"] in named, f"{svc}:{target}"
    for name, svc in config["services"].items():
        for vol in svc.get("volumes", []):
            if vol["type"] == "bind":
                src = Path(vol["source"])
                assert src.exists(), f"{name}: bind source {src} missing"
                assert REPO in src.parents or src == REPO, f"{name}: bind source outside the repo"
                assert vol.get("read_only"), f"{name}: mount {src} read-only"


def test_monitoring_wiring(config):
    services = config["services"]
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert (mounts["/var/lib/grafana/dashboards"] / Path(home).name).is_file()
    provisioning = mounts["/etc/grafana/provisioning"]
    dash_provider = yaml.safe_load((provisioning / "dashboards" / "iotad.yml").read_text())
    assert dash_provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasources = yaml.safe_load((provisioning / "datasources" / "iotad.yml").read_text())["datasources"]
    influx = next(d for d in datasources if d["type"] == "influxdb")
    assert influx["jsonData"]["version"] == "InfluxQL" and influx["url"] == "http://influxdb:8086"
    ds_text = "\n".join(
        line
        for line in (provisioning / "datasources" / "iotad.yml").read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    for ref in re.findall(r"\$\{?([A-Z_]+)", ds_text):
        assert ref in grafana["environment"], f"datasource uses ${ref}, not set on grafana"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    am_targets = {s["target"] for s in services["alertmanager"]["secrets"]}
    assert "alert_webhook_url" in am_targets
    prom_cmd = " ".join(services["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom_cmd
    prom_cfg = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom_cfg["scrape_configs"]}
    port = services["alerter"]["environment"]["IOTAD_ALERT_METRICS_PORT"]
    assert jobs["iotad-alerter"]["static_configs"][0]["targets"] == [f"alerter:{port}"]
