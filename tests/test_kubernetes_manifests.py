"""docs/deploy/kubernetes.yaml + kustomization.yaml, checked without a cluster (none is reachable here): the
proxy in front is the same nginx.conf compose uses, it reaches the bridge by the name nginx.conf proxies to, only
it may reach the bridge, probes and grace periods match the app's drain, and every selector selects something.
Where kubectl is installed, what ``kubectl apply -k`` would send (``kubectl kustomize``) is validated too, and
where a cluster is reachable, the API server checks it (``--dry-run=server``)."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy"
GUNICORN_CONF = DEPLOY.parent.parent / "gunicorn.conf.py"
#: Read by gunicorn.conf.py rather than Settings.
PROCESS_VARIABLES = {"PORT", "WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS", "LOG_LEVEL"}


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_key) == len(docs), "two objects share a kind and name"
    return by_key


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_builds_the_proxy_config_from_the_one_nginx_conf() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file()
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "kallglot-bridge-proxy"
    assert generator["files"] == ["default.conf=nginx.conf"]
    assert (DEPLOY / "nginx.conf").is_file()


def test_the_proxy_reaches_the_bridge_by_the_name_and_port_nginx_conf_uses(objects: dict) -> None:
    upstream = re.search(r"upstream\s+\w+\s*\{[^}]*?server\s+([\w.-]+):(\d+)", (DEPLOY / "nginx.conf").read_text())
    assert upstream, "nginx.conf has no upstream server"
    host, port = upstream.group(1), int(upstream.group(2))
    service = objects[("Service", host)]
    assert port in [p["port"] for p in service["spec"]["ports"]]
    bridge = objects[("Deployment", "app")]
    assert _matches(service["spec"]["selector"], bridge["spec"]["template"]["metadata"]["labels"])
    proxy = objects[("Deployment", "proxy")]["spec"]["template"]["spec"]
    (mount,) = proxy["containers"][0]["volumeMounts"]
    (volume,) = proxy["volumes"]
    assert mount["mountPath"] == "/etc/nginx/conf.d" and volume["configMap"]["name"] == "kallglot-bridge-proxy"


def test_only_the_proxy_may_reach_the_bridge(objects: dict) -> None:
    policy = objects[("NetworkPolicy", "app-only-from-proxy")]["spec"]
    bridge_labels = objects[("Deployment", "app")]["spec"]["template"]["metadata"]["labels"]
    proxy_labels = objects[("Deployment", "proxy")]["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["podSelector"]["matchLabels"], bridge_labels)
    assert not _matches(policy["podSelector"]["matchLabels"], proxy_labels)
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert [_matches(peer["podSelector"]["matchLabels"], proxy_labels) for peer in rule["from"]] == [True]
    assert not _matches(rule["from"][0]["podSelector"]["matchLabels"], bridge_labels)


def test_probes_and_grace_period_match_the_apps_drain(objects: dict) -> None:
    pod = objects[("Deployment", "app")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    graceful = int(re.search(r'GUNICORN_GRACEFUL_TIMEOUT", "(\d+)"', GUNICORN_CONF.read_text()).group(1))
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > graceful + pre_stop


def test_every_selector_selects_its_pods_and_every_variable_is_read(objects: dict) -> None:
    pods = [d["spec"]["template"]["metadata"]["labels"] for (kind, _), d in objects.items() if kind == "Deployment"]
    for (kind, name), obj in objects.items():
        if kind == "Deployment":
            assert _matches(obj["spec"]["selector"]["matchLabels"], obj["spec"]["template"]["metadata"]["labels"])
        elif kind == "Service":
            assert any(_matches(obj["spec"]["selector"], labels) for labels in pods), name
        elif kind == "PodDisruptionBudget":
            assert any(_matches(obj["spec"]["selector"]["matchLabels"], labels) for labels in pods), name
    known = {f.name.upper() for f in fields(Settings)} | PROCESS_VARIABLES
    env = objects[("Deployment", "app")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"] for e in env} <= known


#: The oldest Kubernetes the manifests promise to work on (autoscaling/v2 and policy/v1 are GA since 1.23/1.21)
#: and the newest whose schemas kubernetes-validate ships (it vendors them: no network needed).
KUBERNETES_VERSIONS = ("1.25", kubernetes_validate.latest_version())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(objects: dict, version: str) -> None:
    for (kind, name), obj in objects.items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)  # strict: an unknown field is an error
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name} is not a valid Kubernetes {version} object: {exc.message}")


def test_the_schema_check_can_fail(objects: dict) -> None:
    broken = {**objects[("Deployment", "app")], "spec": {**objects[("Deployment", "app")]["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_autoscaler_scales_the_bridge_within_what_the_disruption_budget_allows(objects: dict) -> None:
    hpa = objects[("HorizontalPodAutoscaler", "app")]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "app")
    pdb = objects[("PodDisruptionBudget", "app")]["spec"]
    # Never fewer pods than the budget keeps plus one, so a voluntary eviction never takes the last instance.
    assert hpa["minReplicas"] >= pdb["minAvailable"] + 1 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert objects[("Deployment", "app")]["spec"]["replicas"] == hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"  # utilization needs a CPU request on the bridge container
    (container,) = objects[("Deployment", "app")]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"]
    # Scale-down hands live calls over: slower than scale-up, one pod at a time.
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert [p["value"] for p in hpa["behavior"]["scaleDown"]["policies"]] == [1]


def test_the_proxy_keeps_media_sockets_open_as_long_as_calls_and_webhooks_short() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    media = conf[conf.index("proxy_set_header Upgrade"):]
    hours = int(re.search(r"proxy_read_timeout\s+(\d+)h;", media).group(1))
    assert hours >= 1 and "proxy_buffering off;" in media
    webhook_timeout = int(re.search(r"proxy_read_timeout\s+(\d+)s;", conf).group(1))
    assert webhook_timeout <= 30  # carriers give up on a webhook after 10-15 s


# -- what `kubectl apply -k docs/deploy` sends -------------------------------------------------------------------

def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (the raw objects are still validated above)")
    return found


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """``kubectl kustomize docs/deploy``: the objects as applied, the proxy's ConfigMap generated from nginx.conf
    under a content-hashed name and the proxy Deployment rewritten to mount that name (no cluster needed)."""
    done = subprocess.run([_kubectl(), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kustomize_output_validates_against_the_kubernetes_schemas(rendered: list[dict[str, Any]],
                                                                        version: str) -> None:
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered if d["kind"] != "ConfigMap"} == set(_raw_keys())
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} as rendered is not a valid Kubernetes {version} "
                        f"object: {exc.message}")


def test_the_proxy_mounts_the_generated_config_map_holding_nginx_conf(rendered: list[dict[str, Any]]) -> None:
    (config_map,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert config_map["data"] == {"default.conf": (DEPLOY / "nginx.conf").read_text()}
    # The generated name carries a hash of the content (a changed nginx.conf rolls the proxy pods)...
    assert config_map["metadata"]["name"].startswith("kallglot-bridge-proxy-")
    (proxy,) = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "proxy"]
    (volume,) = proxy["spec"]["template"]["spec"]["volumes"]
    # ...and the proxy mounts that very name, not the bare one that would not exist in the cluster.
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]


def test_a_reachable_cluster_accepts_the_manifests() -> None:
    """``kubectl apply --dry-run=server -k``: the API server's own admission checks, where a cluster is reachable
    from the test machine (``kubectl cluster-info`` answers); skipped otherwise."""
    kubectl = _kubectl()
    reachable = subprocess.run([kubectl, "cluster-info", "--request-timeout=5s"], capture_output=True, timeout=30)
    if reachable.returncode != 0:
        pytest.skip("no Kubernetes cluster is reachable from this machine")
    done = subprocess.run([kubectl, "apply", "--dry-run=server", "-k", str(DEPLOY)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def _raw_keys() -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"]["name"])
            for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
