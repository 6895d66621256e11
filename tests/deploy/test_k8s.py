"""k8s/: render each overlay with `kubectl kustomize`, validate it, and check what the issue requires.

Built-in kinds are validated strictly against the Kubernetes 1.31 OpenAPI schemas (kubernetes-validate,
offline). The CRD objects (KEDA ScaledObject, Prometheus Operator ServiceMonitor/PrometheusRule/
AlertmanagerConfig) have no schema offline: their required fields are checked here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from pipeline.settings import Settings
from tests.deploy.helpers import REPO, module, run, tool

K8S = REPO / "k8s"
OVERLAYS = ["dev", "prod"]
K8S_VERSION = "1.31.0"
BUILTIN_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1", "autoscaling/v2"}
DEPRECATED_API_VERSIONS = re.compile(
    r"^(extensions/v1beta1|apps/v1beta[12]|batch/v1beta1|policy/v1beta1|autoscaling/v2beta[12]|"
    r"networking\.k8s\.io/v1beta1|rbac\.authorization\.k8s\.io/v1beta1)$"
)
CRD_KINDS = {
    "ScaledObject": "keda.sh/v1alpha1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "AlertmanagerConfig": "monitoring.coreos.com/v1alpha1",
}
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|WEBHOOK|API_KEY|_KEY$", re.I)

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Docs]:
    out = run([tool("kubectl"), "kustomize", str(K8S / "overlays" / request.param)])
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs
    return request.param, docs


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def settings_configmap(docs: Docs) -> dict[str, Any]:
    """The iotad-settings ConfigMap (its generated name carries a content hash)."""
    found = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("iotad-settings-")]
    assert len(found) == 1, f"expected one iotad-settings ConfigMap, found {len(found)}"
    return found[0]


def settings_of(docs: Docs) -> dict[str, str]:
    return settings_configmap(docs)["data"]


def test_builtin_kinds_validate_strictly(overlay):
    kv = module("kubernetes_validate")
    name, docs = overlay
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        assert doc["apiVersion"] in BUILTIN_API_VERSIONS, f"{doc['kind']}: unexpected {doc['apiVersion']}"
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_no_deprecated_or_unknown_api_versions(overlay):
    _, docs = overlay
    for doc in docs:
        assert not DEPRECATED_API_VERSIONS.match(doc["apiVersion"]), doc["apiVersion"]
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == CRD_KINDS[doc["kind"]], doc["kind"]


def test_every_object_is_namespaced_and_labelled(overlay):
    name, docs = overlay
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "iotad", doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == f"iotad-{name}", doc["kind"]


def test_crd_objects_have_required_fields(overlay):
    _, docs = overlay
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    secret_refs: set[tuple[str, str]] = set()

    so = one(docs, "ScaledObject")
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] and target["kind"] in {"Deployment", "StatefulSet"}
    one(docs, target["kind"], target["name"])  # the target exists
    assert spec["triggers"] and all(t["type"] and isinstance(t["metadata"], dict) for t in spec["triggers"])
    for t in spec["triggers"]:
        assert all(isinstance(v, str) for v in t["metadata"].values()), "KEDA trigger metadata values are strings"

    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"iotad-worker", "iotad-alerter"}
    for name, sm in monitors.items():
        selector = sm["spec"]["selector"]["matchLabels"]
        matching = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
        # One Service each; the job label is the Service's name, which the alert rules select.
        assert [s["metadata"]["name"] for s in matching] == [name], f"ServiceMonitor {name} must select Service {name}"
        port_names = {p["name"] for p in matching[0]["spec"]["ports"]}
        assert sm["spec"]["endpoints"] and all(e["port"] in port_names for e in sm["spec"]["endpoints"])

    pr = one(docs, "PrometheusRule")
    for group in pr["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert rule["expr"] and (("alert" in rule) != ("record" in rule))

    amc = one(docs, "AlertmanagerConfig")
    receivers = {r["name"]: r for r in amc["spec"]["receivers"]}
    assert amc["spec"]["route"]["receiver"] in receivers
    for r in receivers.values():
        for cfg in r.get("slackConfigs", []) + r.get("webhookConfigs", []):
            ref = cfg.get("apiURL") or cfg.get("urlSecret")
            assert set(ref) == {"name", "key"}, "webhook URLs come from a Secret reference"
            secret_refs.add((ref["name"], ref["key"]))
    assert secret_refs


def test_pod_security(overlay):
    _, docs = overlay
    specs = list(pod_specs(docs))
    assert {n for n, _ in specs} == {"iotad-worker", "iotad-retrain", "iotad-alerter"}
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), f"{name}/{c['name']}"
            assert not sc.get("privileged"), f"{name}/{c['name']}"
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], f"{name}/{c['name']}"
            assert c["resources"]["limits"]["memory"], f"{name}/{c['name']}"
            # Writable paths with a read-only root: /tmp and the working directory.
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/var/lib/iotad"} <= mounts, f"{name}/{c['name']}"
            image = c["image"]
            assert image != "iotad" and ":" in image and not image.endswith(":latest"), image


def test_worker_probes_and_settings(overlay):
    _, docs = overlay
    sts = one(docs, "StatefulSet", "iotad-worker")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    settings = settings_of(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == int(settings["IOTAD_METRICS_PORT"])
    assert settings["IOTAD_METRICS_HOST"] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/metrics" and get["port"] in ("metrics", ports["metrics"]), probe
    assert c["args"] == ["worker"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["IOTAD_INFLUX_TOKEN"] == {"name": "iotad-influxdb", "key": "token"}
    (env_from,) = c["envFrom"]
    assert env_from["configMapRef"]["name"] == settings_configmap(docs)["metadata"]["name"]
    svc = one(docs, "Service", "iotad-worker")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]


def test_settings_are_real_settings(overlay):
    _, docs = overlay
    fields = set(Settings.model_fields)
    for key in settings_of(docs):
        assert key.startswith("IOTAD_") and key.removeprefix("IOTAD_").lower() in fields, key
    assert settings_of(docs)["IOTAD_INFLUX_VERSION"] == "2"


def test_no_literal_secrets(overlay):
    _, docs = overlay
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created out of band, never committed"
    for key in settings_of(docs):
        assert not SECRET_NAME.search(key), f"{key} belongs in a Secret"
    for name, spec in pod_specs(docs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{name}: {e['name']}"
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"hooks\.slack\.com|https?://[^\s]*@", text)


def test_pdb_and_replicas_bounded_by_partitions(overlay):
    _, docs = overlay
    partitions = int(settings_of(docs)["IOTAD_PARTITIONS"])
    sts = one(docs, "StatefulSet", "iotad-worker")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")
    so = one(docs, "ScaledObject")["spec"]
    assert so["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "iotad-worker"}
    assert 1 <= so["minReplicaCount"] <= so["maxReplicaCount"] <= partitions
    assert 1 <= sts["spec"]["replicas"] <= partitions


def test_keda_scales_on_the_workers_consumer_lag(overlay):
    _, docs = overlay
    settings = settings_of(docs)
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["bootstrapServers"] == settings["IOTAD_KAFKA_BOOTSTRAP"]
    assert meta["consumerGroup"] == settings.get("IOTAD_APP_ID", Settings.model_fields["app_id"].default)
    assert meta["topic"] == f"{settings['IOTAD_TOPIC_PREFIX']}.readings"
    assert meta["allowIdleConsumers"] == "false" and int(meta["lagThreshold"]) > 0


def test_retrain_cronjob(overlay):
    _, docs = overlay
    cj = one(docs, "CronJob", "iotad-retrain")
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    spec = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in {"Never", "OnFailure"}
    (c,) = spec["containers"]
    assert c["args"][0] == "retrain"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    for claim in claims:
        one(docs, "PersistentVolumeClaim", claim)


def test_workers_and_retrain_share_one_registry(overlay):
    """The CronJob promotes into the registry the workers load the champion from (IOTAD_REGISTRY_URL)."""
    name, docs = overlay
    url = settings_of(docs).get("IOTAD_REGISTRY_URL")
    assert url, "IOTAD_REGISTRY_URL must be set: the default (<data_dir>/registry) is private to each pod"
    cm_name = settings_configmap(docs)["metadata"]["name"]
    pods = {
        "iotad-worker": one(docs, "StatefulSet", "iotad-worker")["spec"]["template"]["spec"],
        "iotad-retrain": one(docs, "CronJob", "iotad-retrain")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    }
    claims = {}
    for pod, spec in pods.items():
        (c,) = spec["containers"]
        # Both read the URL from the one ConfigMap; nothing overrides it per pod.
        assert {e["configMapRef"]["name"] for e in c["envFrom"]} == {cm_name}, pod
        assert "IOTAD_REGISTRY_URL" not in {e["name"] for e in c.get("env", [])}, pod
        if url.startswith("/"):
            mounts = [m for m in c["volumeMounts"] if url == m["mountPath"] or url.startswith(m["mountPath"] + "/")]
            mount = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost mount holds the registry
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert "persistentVolumeClaim" in volume, f"{pod}: {url} is not on a shared volume"
            claims[pod] = (volume["persistentVolumeClaim"]["claimName"], mount["mountPath"])
            # The retraining job is the registry's single writer; the workers only read it.
            assert bool(mount.get("readOnly")) == (pod == "iotad-worker"), pod
    if url.startswith("/"):
        assert len(set(claims.values())) == 1, claims
        (claim, _), *_ = claims.values()
        pvc = one(docs, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "workers on several nodes share the registry"
    else:
        assert re.match(r"^(s3|gs|gcs|az|abfs)://[^/]+", url), url
        assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "no volume needed for an object store"
        # Object stores are reached over HTTPS: the NetworkPolicies let the workers and the job out on 443.
        for policy in ("iotad-worker", "iotad-retrain"):
            spec = one(docs, "NetworkPolicy", policy)["spec"]
            assert 443 in {p["port"] for rule in spec["egress"] for p in rule.get("ports", [])}, policy
    if name == "prod":
        assert url.startswith("s3://")


def test_alerter(overlay):
    from connectors.alert_delivery import load_router

    _, docs = overlay
    settings = settings_of(docs)
    dep = one(docs, "Deployment", "iotad-alerter")
    # Exactly one alerter, also during a rollout: the storm guard must see the whole fleet.
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for d in docs:
            if d["kind"] == kind:
                assert d["spec"]["scaleTargetRef"]["name"] != "iotad-alerter", "the alerter must not be scaled"
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"] == ["alerter"]
    assert {e["configMapRef"]["name"] for e in c["envFrom"]} == {settings_configmap(docs)["metadata"]["name"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == int(settings["IOTAD_ALERT_METRICS_PORT"])
    assert settings["IOTAD_METRICS_HOST"] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/metrics" and get["port"] in ("metrics", ports["metrics"]), probe
    svc = one(docs, "Service", "iotad-alerter")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"metrics": "metrics"}

    # The routes file: a generated ConfigMap, mounted where IOTAD_ALERT_ROUTES points.
    env = {e["name"]: e for e in c.get("env", [])}
    routes_path = env["IOTAD_ALERT_ROUTES"]["value"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    routes_mount = mounts[routes_path.rsplit("/", 1)[0]]
    cm_name = volumes[routes_mount["name"]]["configMap"]["name"]
    routes_text = one(docs, "ConfigMap", cm_name)["data"][routes_path.rsplit("/", 1)[1]]
    # Secrets come from files of a Secret volume (a reference; the Secret is created out of band).
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
        for m in c["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    assert secret_mounts and all(m.get("readOnly") for p, m in mounts.items() if p in secret_mounts)
    files = re.findall(r"^\s*\w+_file:\s*(\S+)", routes_text, re.M)
    assert files and not re.findall(r"^\s*\w+_env:", routes_text, re.M)
    for f in files:
        assert any(f.startswith(p + "/") for p in secret_mounts), f"{f} is not in a mounted Secret"
    # It loads (secret files stood in for by temporary ones) with a webhook, a Slack and the Alertmanager receiver.
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        text = routes_text
        for mount in secret_mounts:
            text = text.replace(mount + "/", tmp + "/")
        for f in files:
            Path(tmp, f.rsplit("/", 1)[1]).write_text("https://example.invalid/x" if "url" in f else "s3cr3t")
        routes = Path(tmp, "routes.yml")
        routes.write_text(text)
        router = load_router(routes, {})
    kinds = {type(r).__name__ for r in router.receivers.values()}
    assert {"WebhookReceiver", "SlackReceiver", "AlertmanagerReceiver"} <= kinds

    policy = one(docs, "NetworkPolicy", "iotad-alerter")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["metrics"]
    assert {53, 9092, 443, 9093} <= {p["port"] for rule in policy["egress"] for p in rule["ports"]}


def test_gpu_scheduling(overlay):
    name, docs = overlay
    settings = settings_of(docs)
    sts = one(docs, "StatefulSet", "iotad-worker")
    spec = sts["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    if name == "prod":
        assert settings["IOTAD_DEVICE"] == "cuda"
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
        assert c["image"].endswith("-cuda")
    else:
        assert settings["IOTAD_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
        assert not c["image"].endswith("-cuda")


def test_network_policies(overlay):
    _, docs = overlay
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = policies["iotad-default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    worker = policies["iotad-worker"]
    ports = [p["port"] for rule in worker["ingress"] for p in rule["ports"]]
    assert ports == ["metrics"]
    egress_ports = {p["port"] for rule in worker["egress"] for p in rule["ports"]}
    assert {53, 9092, 8086} <= egress_ports


def test_prometheusrule_equals_compose_rules(overlay):
    _, docs = overlay
    rules = yaml.safe_load((REPO / "deploy" / "rules" / "iotad.rules.yml").read_text())
    assert one(docs, "PrometheusRule")["spec"]["groups"] == rules["groups"]


def test_yamllint():
    config = (
        "{extends: default, rules: {document-start: disable, line-length: {max: 160}, "
        "truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}, "
        "indentation: {indent-sequences: whatever}}}"
    )
    paths = [K8S, REPO / "deploy", REPO / "docker-compose.yml", REPO / "dashboards"]
    run([tool("yamllint"), "--strict", "-f", "parsable", "-d", config, *map(str, paths)])
