"""deploy/: every file parses, the Kubernetes objects are schema-valid, and what the files claim about
the components is true — each probe and scrape target points at a route the component serves on the
port it listens on, every variable set is a real setting, and every secret comes from a Secret.

Ports are derived the way the component derives them: the settings model validated from the env the
manifest gives the container (its ConfigMap, its own env, the example Secret's values). Routes come
from the components' own route tables: the ingress's aiohttp app, the worker's faust web app, the
sink's web app.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import orjson
import pytest
import yaml
from pydantic import AliasChoices, SecretStr
from pydantic_settings import BaseSettings

from audience_relay.settings import Settings
from devtools.localkafka import free_port
from devtools.wait import until_async

PROJECT = Path(__file__).resolve().parents[1]
DEPLOY = PROJECT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"
SECRET_NAME = "audience-relay-secrets"


def env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    return str(alias.choices[0])


ENV_NAMES = {env_name(f): f for f in Settings.model_fields}


def _holds_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
        return any(_holds_secret(f.annotation) for f in annotation.model_fields.values())
    return any(_holds_secret(arg) for arg in typing.get_args(annotation))


SECRET_ENV = {
    name for name, field in ENV_NAMES.items() if _holds_secret(Settings.model_fields[field].annotation)
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings here come from the deploy files alone, not from the test run's environment."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            yield path, doc


def example_secret() -> dict[str, str]:
    [secret] = yaml_docs(K8S / "secret.example.yaml")
    assert secret["metadata"]["name"] == SECRET_NAME
    return dict(secret["stringData"])


def configmaps() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for _, d in k8s_objects() if d["kind"] == "ConfigMap"}


# --- what the components serve ----------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    kind: str  # ingress | worker | sink | topics
    sink: str | None = None


def component_of(args: list[str]) -> Component:
    """The component a container runs, from its command (the image's entrypoint is audience-relay)."""
    if args[:1] == ["sink"]:
        return Component("sink", args[1])
    if args[:2] == ["topics", "create"]:
        return Component("topics")
    assert args in (["ingress"], ["worker"]), f"unknown command {args}"
    return Component(args[0])


def _paths(router: Any) -> set[str]:
    return {r.resource.canonical for r in router.routes() if r.method == "GET" and r.resource is not None}


def served(component: Component, settings: Settings) -> dict[int, set[str]]:
    """Port → GET paths the component serves with ``settings``."""
    if component.kind == "ingress":
        from ingress.app import build_app, build_ops_app

        app = build_app(settings)
        routes: dict[int, set[str]] = {settings.ingress_port: _paths(app.router)}
        # The operations port (RELAY_INGRESS_METRICS_PORT) serves /metrics, /healthz and /readyz.
        routes.setdefault(settings.ingress_metrics_port, set()).update(_paths(build_ops_app(app).router))
        return routes
    if component.kind == "worker":
        from processors.app import create_app

        web = create_app(settings).web
        web.init_server()  # adds faust's own blueprints, as the worker does at start-up
        return {settings.worker_web_port: _paths(web.web_app.router)}
    if component.kind == "sink":
        from sinks.run import build_engine, web_app

        assert component.sink is not None
        return {
            settings.sink_port(component.sink): _paths(web_app(build_engine(settings, component.sink)).router)
        }
    return {}


# --- Kubernetes ---------------------------------------------------------------------------------------


def test_every_deploy_file_parses() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 12
    for path in files:
        if path.suffix == ".json":
            assert isinstance(orjson.loads(path.read_bytes()), dict), path
        else:
            assert yaml_docs(path), path


def test_kubernetes_objects_are_schema_valid() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    kinds = []
    for path, doc in k8s_objects():
        for field in ("apiVersion", "kind", "metadata"):
            assert field in doc, f"{path}: {field} missing"
        assert doc["metadata"].get("name"), path
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append((doc["kind"], doc["metadata"]["name"]))
    for expected in [
        ("Deployment", "audience-relay-ingress"),
        ("Service", "audience-relay-ingress"),
        ("HorizontalPodAutoscaler", "audience-relay-ingress"),
        ("StatefulSet", "audience-relay-worker"),
        ("Service", "audience-relay-worker"),
        ("Deployment", "audience-relay-sink-pushly"),
        ("Deployment", "audience-relay-sink-odp"),
        ("Deployment", "audience-relay-sink-analytics"),
        ("ConfigMap", "audience-relay-config"),
        ("Secret", SECRET_NAME),
    ]:
        assert expected in kinds, expected


def test_the_schema_validation_really_runs_offline() -> None:
    [deployment, *_] = yaml_docs(K8S / "ingress.yaml")
    broken = orjson.loads(orjson.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@dataclass
class Container:
    where: str
    pod: dict[str, Any]
    spec: dict[str, Any]
    env: dict[str, str]
    component: Component
    settings: Settings


def containers() -> list[Container]:
    """Every container of every workload, with the env it gets and the settings that env makes."""
    maps, secret = configmaps(), example_secret()
    out = []
    for path, doc in k8s_objects():
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = doc["spec"]["template"]
        for spec in pod["spec"]["containers"]:
            where = f"{path.name} {doc['kind']}/{doc['metadata']['name']}"
            env: dict[str, str] = {}
            for source in spec.get("envFrom", []):
                env.update(maps[source["configMapRef"]["name"]])
            fields: dict[str, str] = {}
            for item in spec.get("env", []):
                if "value" in item:
                    # Kubernetes expands $(NAME) from variables defined before this one.
                    value = str(item["value"])
                    for name, field in fields.items():
                        value = value.replace(f"$({name})", field)
                    assert "$(" not in value, f"{where}: {item['name']} uses an undefined variable"
                    env[item["name"]] = value
                elif "fieldRef" in item["valueFrom"]:
                    # Downward API values (pod name, namespace) only feed $(NAME) expansion.
                    fields[item["name"]] = "pod-" + item["valueFrom"]["fieldRef"]["fieldPath"].split(".")[-1]
                else:
                    ref = item["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == SECRET_NAME, where
                    assert ref["key"] in secret, f"{where}: {ref['key']} is not in secret.example.yaml"
                    env[item["name"]] = secret[ref["key"]]
            settings = Settings.model_validate(env)
            out.append(Container(where, pod, spec, env, component_of(spec["args"]), settings))
    return out


def test_every_variable_is_a_setting_and_every_secret_comes_from_a_secret() -> None:
    assert {"RELAY_INGRESS_API_KEYS", "PUSHLY_API_KEY", "ODP_AUTH_TOKEN", "RELAY_SOURCES"} <= SECRET_ENV
    for name, data in configmaps().items():
        assert set(data) <= set(ENV_NAMES), f"ConfigMap {name}: not settings: {set(data) - set(ENV_NAMES)}"
        assert not set(data) & SECRET_ENV, f"ConfigMap {name} holds secrets: {set(data) & SECRET_ENV}"
    assert set(example_secret()) <= SECRET_ENV
    for c in containers():
        for item in c.spec.get("env", []):
            if "fieldRef" in item.get("valueFrom", {}):
                continue
            assert item["name"] in ENV_NAMES, f"{c.where}: {item['name']} is not a setting"
            if item["name"] in SECRET_ENV:
                assert "secretKeyRef" in item.get("valueFrom", {}), (
                    f"{c.where}: {item['name']} not from a Secret"
                )
                assert item["valueFrom"]["secretKeyRef"]["key"] == item["name"]
    by_component = {(c.component.kind, c.component.sink): c for c in containers()}
    pushly, odp = by_component[("sink", "pushly")], by_component[("sink", "odp")]
    assert pushly.settings.pushly_api_key is not None and odp.settings.odp_auth_token is not None
    worker = by_component[("worker", None)]
    assert worker.env["RELAY_STANDBY_REPLICAS"] == "1"
    # The membership queries are authenticated with the ingress's keys, and forwarded between pods
    # at a name the headless Service resolves.
    assert worker.settings.ingress_api_keys and worker.settings.oauth_signing_key is not None
    assert worker.env["RELAY_WORKER_ADVERTISED_URL"].startswith("http://pod-name.audience-relay-worker.")


def _port(spec: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in spec.get("ports", []) if p.get("name") == port]
    return int(number)


def test_probes_and_scrape_annotations_point_at_served_routes() -> None:
    checked = 0
    for c in containers():
        routes = served(c.component, c.settings)
        for declared in c.spec.get("ports", []):
            assert declared["containerPort"] in routes, f"{c.where}: nothing listens on {declared}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe not in c.spec:
                continue
            get = c.spec[probe]["httpGet"]
            port = _port(c.spec, get["port"])
            assert get["path"] in routes.get(port, set()), (
                f"{c.where} {probe}: {get['path']} on {port}; served: {routes}"
            )
            checked += 1
        notes = c.pod["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            port = int(notes["prometheus.io/port"])
            assert notes["prometheus.io/path"] in routes.get(port, set()), f"{c.where}: scrape {port}"
            checked += 1
    assert checked >= 14


def test_worker_keeps_its_table_on_a_claimed_volume_and_is_reachable() -> None:
    [sts] = [d for _, d in k8s_objects() if d["kind"] == "StatefulSet"]
    [worker] = [c for c in containers() if c.component.kind == "worker"]
    [claim] = sts["spec"]["volumeClaimTemplates"]
    [mount] = [m for m in worker.spec["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert Path(mount["mountPath"]) == worker.settings.worker_data_dir
    services = {d["metadata"]["name"]: d for _, d in k8s_objects() if d["kind"] == "Service"}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        if service["spec"]["selector"].items() <= labels.items():
            for port in service["spec"]["ports"]:
                assert _port(worker.spec, port["targetPort"]) == worker.settings.worker_web_port
    [ingress_svc] = [s for n, s in services.items() if n == "audience-relay-ingress"]
    [ingress] = [c for c in containers() if c.component.kind == "ingress"]
    targets = {_port(ingress.spec, p["targetPort"]) for p in ingress_svc["spec"]["ports"]}
    assert ingress.settings.ingress_port in targets


# --- compose, Prometheus, Grafana, Dockerfile ---------------------------------------------------------

_INTERPOLATION = re.compile(r"^\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}$")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def compose_settings(environment: dict[str, Any]) -> Settings:
    secret = example_secret()
    env = {}
    for name, value in environment.items():
        match = _INTERPOLATION.match(str(value))
        if match:  # a value the operator supplies: use a plausible one
            env[name] = secret.get(name, "https://destination.example.invalid/hook")
        else:
            env[name] = str(value)
    return Settings.model_validate(env)


def test_compose_services_match_the_components() -> None:
    services = compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    relay = {n: s for n, s in services.items() if s.get("image", "").startswith("audience-relay")}
    kinds = sorted(" ".join(s["command"]) for s in relay.values())
    assert kinds == ["ingress", "sink analytics", "sink odp", "sink pushly", "topics create", "worker"]
    scrape_targets: dict[str, tuple[int, set[str]]] = {}
    for name, service in relay.items():
        environment = service.get("environment", {})
        for var, value in environment.items():
            assert var in ENV_NAMES, f"compose {name}: {var} is not a setting"
            if var in SECRET_ENV:
                assert _INTERPOLATION.match(str(value)), f"compose {name}: {var} must come from outside"
        component = component_of(service["command"])
        routes = served(component, compose_settings(environment))
        if "healthcheck" in service:
            url = re.search(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)", " ".join(service["healthcheck"]["test"]))
            assert url, name
            assert url.group(2) in routes.get(int(url.group(1)), set()), f"compose {name} healthcheck"
        for port in routes:
            if "/metrics" in routes[port]:
                scrape_targets[name] = (port, routes[port])
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    scraped = set()
    for job in prometheus["scrape_configs"]:
        assert job["job_name"].startswith("audience-relay-")  # the alerts select job=~"audience-relay-.*"
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in relay, f"prometheus target {target} is no compose service"
                routes = served(
                    component_of(relay[host]["command"]), compose_settings(relay[host]["environment"])
                )
                assert job["metrics_path"] in routes.get(int(port), set()), f"prometheus target {target}"
                scraped.add(host)
    assert scraped == set(scrape_targets) | {"ingress"} - {"topics"}, (scraped, scrape_targets)
    grafana = services["grafana"]["volumes"]
    for volume in grafana + services["prometheus"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / source).exists(), source
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = orjson.loads((DEPLOY / "grafana/audience-relay.json").read_bytes())
    assert dashboard["templating"]["list"][0]["current"]["value"] == uid


def test_dockerfile_installs_the_project_and_runs_as_a_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    pyproject = (PROJECT / "pyproject.toml").read_text()
    packages = re.findall(r'"([a-z_]+)\*"', pyproject.split("[tool.setuptools.packages.find]")[1])
    assert packages and all(f"COPY {p} ./{p}" in lines for p in packages), packages
    assert "COPY pyproject.toml README.md ./" in lines  # pyproject names README.md as the readme
    assert any(line.startswith("RUN pip wheel") and line.endswith(" .") for line in lines)
    assert any("pip install" in line and "audience-relay" in line for line in lines)
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user.split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["audience-relay"]' in lines
    ignored = {line.strip() for line in (PROJECT / ".dockerignore").read_text().splitlines()}
    assert not ignored & {*packages, "pyproject.toml", "README.md"}
    # The image's data dir is where the StatefulSet mounts the worker's volume.
    [worker] = [c for c in containers() if c.component.kind == "worker"]
    assert f"RELAY_WORKER_DATA_DIR={worker.settings.worker_data_dir}" in text


def test_dockerfile_installs_the_locked_versions_of_the_runtime_dependencies() -> None:
    """Every pip command of the image takes requirements.lock as constraints, and installs the project
    without its dev extra: the image gets the runtime dependencies at the versions CI tested."""
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    ignored = {line.strip() for line in (PROJECT / ".dockerignore").read_text().splitlines()}
    assert "requirements.lock" not in ignored
    assert "COPY requirements.lock ./" in lines
    pips = [line for line in lines if re.search(r"\bpip (wheel|install|download)\b", line)]
    assert len(pips) == 2, pips  # the build stage's wheels and the runtime stage's install
    for line in pips:
        assert re.search(r"(^|\s)-c \S*requirements\.lock(\s|$)", line), line
        assert "[dev]" not in line and "--upgrade" not in line, line
    [install] = [line for line in pips if "pip install" in line]
    assert "--no-index" in install  # only the wheels built under the lock
    # The runtime stage reads the lock from where it copies it.
    [copied] = [
        line for line in lines if line.startswith("COPY --from=build") and "requirements.lock" in line
    ]
    assert copied.split()[-1] in install


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "audience_relay.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


async def test_a_running_ingress_answers_its_probes_and_scrape(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """``audience-relay ingress`` with the manifest's env (and the example Secret) serves what the
    manifest probes and scrapes. Ports are moved to free ones, the broker is the test broker."""
    [ingress] = [c for c in containers() if c.component.kind == "ingress"]
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    # The manifest's Kafka connection (a SASL_SSL cluster) is replaced by the test broker's.
    env.update({k: v for k, v in ingress.env.items() if not k.startswith("KAFKA_")})
    env.update({k: v for k, v in kafka_settings.to_env().items() if k.startswith("KAFKA_")})
    env.update(
        RELAY_TOPIC_PREFIX=kafka_settings.topic_prefix,
        RELAY_INGRESS_HOST="127.0.0.1",
        RELAY_INGRESS_PORT=str(port),
        RELAY_INGRESS_METRICS_PORT=str(metrics_port),
    )
    moved = {ingress.settings.ingress_port: port, ingress.settings.ingress_metrics_port: metrics_port}
    log = tmp_path / "ingress.log"
    proc = _spawn(ingress.spec["args"], env, log)
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert proc.poll() is None, log.read_text()[-2000:]
                get = ingress.spec["readinessProbe"]["httpGet"]
                url = f"http://127.0.0.1:{moved[_port(ingress.spec, get['port'])]}{get['path']}"
                try:
                    async with http.get(url) as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await until_async(ready, 60, "the ingress's readiness probe", interval=0.2)
            get = ingress.spec["livenessProbe"]["httpGet"]
            async with http.get(
                f"http://127.0.0.1:{moved[_port(ingress.spec, get['port'])]}{get['path']}"
            ) as r:
                assert r.status == 200
            key = example_secret()["RELAY_INGRESS_API_KEYS"].split(",")[0]
            async with http.post(
                f"http://127.0.0.1:{port}/v1/lytics", data=b'{"data": {}}', headers={"X-API-KEY": key}
            ) as r:
                assert r.status == 200, await r.text()
            notes = ingress.pod["metadata"]["annotations"]
            scrape_port = moved[int(notes["prometheus.io/port"])]
            async with http.get(f"http://127.0.0.1:{scrape_port}{notes['prometheus.io/path']}") as r:
                assert r.status == 200
                assert 'relay_ingress_requests_total{route="/v1/lytics",source="default",status="200"}' in (
                    await r.text()
                )
    finally:
        _stop(proc)
    lines = [orjson.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert key not in log.read_text() and lines


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool (Debian package prometheus, `make promtool`) not installed; CI installs it",
)
def test_alert_rules_fire_as_intended(tmp_path: Path) -> None:
    """promtool's unit tests of the alert rules (alerts.test.yml) and its check of the scrape config."""
    prometheus = DEPLOY / "prometheus"
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"], cwd=prometheus, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The config names the rules at their path inside the Prometheus container.
    config = (prometheus / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(prometheus / "alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
