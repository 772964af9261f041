"""deploy/kubernetes: every manifest is valid (offline, strict) and the manifests agree.

Built-in kinds are validated by kubernetes-validate in strict mode, the KServe and KubeRay
resources by tests/kubernetes_helpers.py. Then the cross-manifest rules: selectors, ports, the
autoscaler and disruption budget targets, probes on the routes create_app really serves, the
service's settings, the security context, the drain time. Broken copies prove each rule bites.
"""

from __future__ import annotations

import ast
import importlib
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from kubernetes_helpers import (
    Doc,
    Manifest,
    PodSite,
    cpu_cores,
    env_of,
    image_tag,
    load_manifests,
    manifest_problems,
    mutated,
    pod_sites,
    port_number,
    serve_config,
)
from packaging.specifiers import SpecifierSet
from pydantic import ValidationError
from starlette.routing import Match

from mcdrop.api.admin import metrics
from mcdrop.api.oip import live, ready
from mcdrop.app import create_app
from mcdrop.config import DEFAULT_SHUTDOWN_TIMEOUT_S as GRACEFUL_SHUTDOWN_S
from mcdrop.config import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
RAY_MODULE = ROOT / "service" / "mcdrop" / "ray_serve.py"
RAY_IMPORT_PATH = "mcdrop.ray_serve:build_app"
UID = 10001  # the image's non-root user (the container convention; checked against Dockerfile)
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXPECTED_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                  "InferenceService", "RayService"}  # fmt: skip


@dataclass(frozen=True)
class Routes:
    """What create_app serves: GET paths by Starlette's own matching, and the health routes."""

    app: FastAPI
    live: str
    ready: str
    metrics: str

    @classmethod
    def of_app(cls) -> Routes:
        app = create_app(Settings(model_repository=Path("models")))
        paths = (app.url_path_for(handler.__name__) for handler in (live, ready, metrics))
        return cls(app, *paths)

    def serves(self, path: str) -> bool:
        """Whether a GET of this path reaches a route (not a 404 or a 405)."""
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "app": self.app}
        return any(route.matches(scope)[0] == Match.FULL for route in self.app.router.routes)


ROUTES = Routes.of_app()


def manifests() -> list[Manifest]:
    return load_manifests(KUBERNETES)


def of_kind(found: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in found if m.doc.get("kind") == kind]


def containers(site: PodSite) -> list[Doc]:
    return list(site.spec.get("containers", []))


def pod_labels(deployment: Manifest) -> dict[str, str]:
    return dict(deployment.doc["spec"]["template"].get("metadata", {}).get("labels", {}))


# -- the cross-manifest rules -------------------------------------------------------------------


def selector_problems(found: list[Manifest]) -> list[str]:
    """Deployments select their own pods; every Service and PDB selects every Deployment's pods."""
    problems = []
    deployments = of_kind(found, "Deployment")
    for deployment in deployments:
        wanted = deployment.doc["spec"]["selector"].get("matchLabels", {})
        if not wanted.items() <= pod_labels(deployment).items():
            problems.append(f"{deployment.where}: selector {wanted} does not match its pod labels")
    selectors = [(m, m.doc["spec"].get("selector", {})) for m in of_kind(found, "Service")]
    selectors += [
        (m, m.doc["spec"].get("selector", {}).get("matchLabels", {}))
        for m in of_kind(found, "PodDisruptionBudget")
    ]
    for manifest, selector in selectors:
        for deployment in deployments:
            if not selector or not selector.items() <= pod_labels(deployment).items():
                problems.append(
                    f"{manifest.where}: selector {selector} does not match the pods of "
                    f"{deployment.where}"
                )
    return problems


def service_port_problems(found: list[Manifest]) -> list[str]:
    """Each Service targetPort is a declared port (by name or number) of every Deployment."""
    problems = []
    for service in of_kind(found, "Service"):
        for port in service.doc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for deployment in of_kind(found, "Deployment"):
                pod = deployment.doc["spec"]["template"]["spec"]
                if all(port_number(c, target) is None for c in pod["containers"]):
                    problems.append(
                        f"{service.where}: targetPort {target!r} is no port of {deployment.where}"
                    )
    return problems


def autoscaling_problems(found: list[Manifest]) -> list[str]:
    """HPAs target an existing Deployment that leaves replicas to them; PDBs allow an eviction."""
    problems = []
    deployments = of_kind(found, "Deployment")
    floor = 1
    for hpa in of_kind(found, "HorizontalPodAutoscaler"):
        spec = hpa.doc["spec"]
        ref = spec["scaleTargetRef"]
        floor = spec.get("minReplicas", 1)
        if floor > spec["maxReplicas"]:
            problems.append(f"{hpa.where}: minReplicas {floor} > maxReplicas {spec['maxReplicas']}")
        # The CPU and GPU variants share a name: the HPA scales whichever one is applied.
        targets = [d for d in deployments if d.doc["metadata"]["name"] == ref["name"]]
        if (ref.get("apiVersion"), ref["kind"]) != ("apps/v1", "Deployment") or not targets:
            problems.append(f"{hpa.where}: scaleTargetRef {ref} names no Deployment here")
        resources = [
            m["resource"]["name"] for m in spec.get("metrics", []) if m["type"] == "Resource"
        ]
        for target in targets:
            if "replicas" in target.doc["spec"]:
                problems.append(
                    f"{target.where}: sets spec.replicas although {hpa.where} owns the count "
                    "(every kubectl apply would reset it)"
                )
            for container in target.doc["spec"]["template"]["spec"]["containers"]:
                for resource in resources:
                    if resource not in container.get("resources", {}).get("requests", {}):
                        problems.append(
                            f"{target.where}: container {container['name']} has no {resource} "
                            f"requests, which {hpa.where}'s utilisation target is relative to"
                        )
    for pdb in of_kind(found, "PodDisruptionBudget"):
        spec = pdb.doc["spec"]
        low, most = spec.get("minAvailable"), spec.get("maxUnavailable")
        if (isinstance(low, int) and low >= floor) or most in (0, "0%") or low == "100%":
            problems.append(
                f"{pdb.where}: with {floor} replica(s) at least, no pod could ever be evicted"
            )
    return problems


def probe_problems(sites: list[PodSite], routes: Routes) -> list[str]:
    """Readiness on the app's ready route, liveness on its live route, ports that exist."""
    expected = {"readinessProbe": {routes.ready}, "livenessProbe": {routes.live},
                "startupProbe": {routes.live, routes.ready}}  # fmt: skip
    problems = []
    for site in sites:
        if not site.serves_http:
            continue
        for container in containers(site):
            where = f"{site.where} container {container['name']}"
            for kind, paths in expected.items():
                probe = container.get(kind)
                if probe is None:
                    if kind != "startupProbe":
                        problems.append(f"{where}: no {kind}")
                    continue
                get = probe.get("httpGet")
                if get is None:
                    problems.append(f"{where}: {kind} is not an httpGet on the health API")
                    continue
                path = get.get("path", "/").split("?")[0]
                if not routes.serves(path):
                    problems.append(f"{where}: {kind} path {path} is not a GET route of the app")
                elif path not in paths:
                    problems.append(f"{where}: {kind} probes {path}, should be one of {paths}")
                if port_number(container, get["port"]) is None:
                    problems.append(f"{where}: {kind} port {get['port']!r} is not declared")
    return problems


def prometheus_problems(sites: list[PodSite], routes: Routes) -> list[str]:
    """Scrape annotations name a declared port and the app's metrics route."""
    problems = []
    for site in sites:
        for prefix in ("prometheus.io", "prometheus.kserve.io"):
            port, path = (site.annotations.get(f"{prefix}/{key}") for key in ("port", "path"))
            if port is None and path is None:
                continue
            if not any(port_number(c, int(port or 0)) for c in containers(site)):
                problems.append(f"{site.where}: {prefix}/port {port!r} is no container port")
            if path != routes.metrics:
                problems.append(f"{site.where}: {prefix}/path {path!r} is not {routes.metrics}")
    return problems


def settings_problems(sites: list[PodSite]) -> list[str]:
    """MCDROP_* variables are real, valid settings that agree with the pod they configure."""
    problems = []
    for site in sites:
        if not site.serves_http:
            continue
        for container in containers(site):
            where = f"{site.where} container {container['name']}"
            env = env_of(container)
            values: dict[str, Any] = {}
            for name, value in env.items():
                if not name.startswith("MCDROP_"):
                    continue
                key = name.removeprefix("MCDROP_").lower()
                if key not in Settings.model_fields:
                    problems.append(f"{where}: {name} is not a setting of service/mcdrop/config.py")
                values[key] = value
            try:
                settings = Settings(
                    **{k: v for k, v in values.items() if k in Settings.model_fields}
                )
            except ValidationError as error:
                problems.append(f"{where}: invalid MCDROP_* value: {error}")
                continue
            if port_number(container, settings.port) is None:
                problems.append(
                    f"{where}: MCDROP_PORT={settings.port} is no declared containerPort"
                )
            if settings.host not in ("0.0.0.0", "::"):
                problems.append(f"{where}: MCDROP_HOST={settings.host} is unreachable from outside")
            limits = container.get("resources", {}).get("limits", {})
            if ("nvidia.com/gpu" in limits) != (settings.device == "cuda"):
                problems.append(
                    f"{where}: MCDROP_DEVICE={settings.device} with nvidia.com/gpu limit "
                    f"{limits.get('nvidia.com/gpu')}: a GPU pod must use cuda, and only it"
                )
            threads = env.get("OMP_NUM_THREADS")
            if threads is None or "cpu" not in limits:
                problems.append(f"{where}: needs a CPU limit and OMP_NUM_THREADS sized to it")
            elif int(threads) > cpu_cores(limits["cpu"]):
                problems.append(f"{where}: OMP_NUM_THREADS={threads} exceeds the CPU limit")
    return problems


def security_problems(sites: list[PodSite]) -> list[str]:
    """Non-root UID, no privilege escalation, no capabilities, seccomp, read-only root + /tmp."""
    problems = []
    for site in sites:
        pod = site.spec.get("securityContext", {})
        if site.spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{site.where}: automountServiceAccountToken should be false")
        volumes = {v["name"]: v for v in site.spec.get("volumes", [])}
        for container in containers(site):
            where = f"{site.where} container {container['name']}"
            own = container.get("securityContext", {})
            merged = {**pod, **own}
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            for level, context in (("pod", pod), ("container", merged)):
                if context.get("runAsUser", UID) != UID or "runAsUser" not in merged:
                    problems.append(
                        f"{where}: {level} runAsUser {context.get('runAsUser')} is not {UID}"
                    )
            if merged.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if own.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in own.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if own.get("readOnlyRootFilesystem", False) is not site.read_only_root:
                problems.append(f"{where}: readOnlyRootFilesystem should be {site.read_only_root}")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if "emptyDir" not in volumes.get(mounts.get("/tmp", ""), {}):
                problems.append(f"{where}: /tmp is not a writable emptyDir volume")
    return problems


def drain_problems(sites: list[PodSite]) -> list[str]:
    """The grace period covers the preStop pause and the server's own graceful drain."""
    problems = []
    for site in sites:
        if not site.serves_http:
            continue
        grace = site.spec.get("terminationGracePeriodSeconds", 30)
        for container in containers(site):
            pre_stop = container.get("lifecycle", {}).get("preStop")
            if pre_stop is None:
                problems.append(f"{site.where}: no preStop pause before SIGTERM")
                continue
            pause = pre_stop.get("sleep", {}).get("seconds", 0)
            if grace < pause + GRACEFUL_SHUTDOWN_S:
                problems.append(
                    f"{site.where}: terminationGracePeriodSeconds {grace} < preStop {pause} s + "
                    f"drain {GRACEFUL_SHUTDOWN_S} s (service/mcdrop/config.py)"
                )
    return problems


def image_problems(sites: list[PodSite], version: str) -> list[str]:
    """Every container runs mcdrop at this project's version (a variant suffix allowed)."""
    problems = []
    for site in sites:
        for container in containers(site):
            name, tag = image_tag(container["image"])
            if name != "mcdrop" or not re.fullmatch(rf"{re.escape(version)}(-[a-z0-9]+)?", tag):
                problems.append(f"{site.where}: image {container['image']} is not mcdrop:{version}")
    return problems


def ray_problems(found: list[Manifest]) -> list[str]:
    """The Serve app is mcdrop's builder at /, on the head's serve port, and fits the workers."""
    problems = []
    for manifest in of_kind(found, "RayService"):
        where = manifest.where
        config = serve_config(manifest.doc)
        cluster = manifest.doc["spec"]["rayClusterConfig"]
        (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        port = config.get("http_options", {}).get("port", 8000)
        if port_number(head, "serve") != port:
            problems.append(f"{where}: Serve http port {port} is not the head's 'serve' port")
        workers = cluster.get("workerGroupSpecs", [])
        limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers]
        for app in config.get("applications", []):
            if app.get("import_path") != RAY_IMPORT_PATH:
                problems.append(
                    f"{where}: import_path {app.get('import_path')} != {RAY_IMPORT_PATH}"
                )
            if app.get("route_prefix", "/") != "/":
                problems.append(f"{where}: route_prefix must be / so the API paths stay the same")
            args = app.get("args", {})
            cpus, replicas = float(args.get("num_cpus", 1)), int(args.get("replicas", 1))
            if not any(cpu_cores(lim.get("cpu", 0)) >= cpus for lim in limits):
                problems.append(f"{where}: num_cpus {cpus} fits on no worker")
            room = sum(g.get("maxReplicas", 1) * cpu_cores(lim.get("cpu", 0))
                       for g, lim in zip(workers, limits, strict=True))  # fmt: skip
            if cpus * replicas > room:
                problems.append(
                    f"{where}: {replicas} replicas x num_cpus {cpus} > {room} worker CPUs"
                )
            if args.get("num_gpus", 0) and not any("nvidia.com/gpu" in lim for lim in limits):
                problems.append(f"{where}: num_gpus set but no worker has an nvidia.com/gpu limit")
    return problems


def consistency_problems(found: list[Manifest]) -> list[str]:
    sites = list(pod_sites(found))
    return (
        selector_problems(found)
        + service_port_problems(found)
        + autoscaling_problems(found)
        + probe_problems(sites, ROUTES)
        + prometheus_problems(sites, ROUTES)
        + settings_problems(sites)
        + security_problems(sites)
        + drain_problems(sites)
        + image_problems(sites, PROJECT["version"])
        + ray_problems(found)
    )


def all_problems(found: list[Manifest]) -> list[str]:
    return [p for m in found for p in manifest_problems(m)] + consistency_problems(found)


# -- the real manifests -------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: validation must work offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_every_kind_the_issue_asks_for_is_there() -> None:
    kinds = [m.doc["kind"] for m in manifests()]
    assert set(kinds) == EXPECTED_KINDS
    assert kinds.count("Deployment") == 2, "a CPU and a GPU Deployment"


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("manifest", manifests(), ids=lambda m: m.path)
def test_manifest_validates_strictly_offline(manifest: Manifest) -> None:
    assert manifest_problems(manifest) == []


def test_the_manifests_agree_with_each_other_and_the_app() -> None:
    assert consistency_problems(manifests()) == []


def test_routes_come_from_the_app() -> None:
    # Sanity of the reference itself: three distinct routes the app serves, and a path it
    # does not serve (or only for POST) is told apart.
    assert len({ROUTES.live, ROUTES.ready, ROUTES.metrics}) == 3
    assert all(ROUTES.serves(path) for path in (ROUTES.live, ROUTES.ready, ROUTES.metrics))
    assert not ROUTES.serves("/healthz")
    assert not ROUTES.serves("/v2/repository/index")  # POST only


@pytest.mark.anyio
async def test_probe_and_scrape_paths_answer_on_a_running_app(tmp_path: Path) -> None:
    paths = set()
    for site in pod_sites(manifests()):
        for container in containers(site):
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in container:
                    paths.add(container[kind]["httpGet"]["path"])
        paths |= {v for k, v in site.annotations.items() if k.endswith("/path")}
    assert paths == {ROUTES.live, ROUTES.ready, ROUTES.metrics}
    app = create_app(Settings(model_repository=tmp_path))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://mcdrop.test") as client,
    ):
        for path in sorted(paths):
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)


# -- the checks catch mistakes ------------------------------------------------------------------


def container_of(doc: Doc) -> Doc:
    spec = doc["spec"]["predictor"] if doc["kind"] == "InferenceService" else None
    spec = spec or doc["spec"]["template"]["spec"]
    container: Doc = spec["containers"][0]
    return container


def set_env(doc: Doc, name: str, value: str) -> None:
    env = container_of(doc)["env"]
    for entry in env:
        if entry["name"] == name:
            entry["value"] = value
            return
    env.append({"name": name, "value": value})


def rename_env(doc: Doc, old: str, new: str) -> None:
    for entry in container_of(doc)["env"]:
        if entry["name"] == old:
            entry["name"] = new


def ray_cluster(doc: Doc) -> Doc:
    cluster: Doc = doc["spec"]["rayClusterConfig"]
    return cluster


def edit_serve_config(old: str, new: str) -> Callable[[Doc], object]:
    def change(doc: Doc) -> None:
        assert old in doc["spec"]["serveConfigV2"], old
        doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(old, new)

    return change


DEPLOYMENT, GPU = "deployment.yaml", "gpu/deployment-gpu.yaml"
SERVICE, HPA, PDB = "service.yaml", "hpa.yaml", "pdb.yaml"
KSERVE, RAY = "kserve/inferenceservice.yaml", "kuberay/rayservice.yaml"
BROKEN: list[tuple[str, str, Callable[[Doc], object], str]] = [
    ("unknown container field", DEPLOYMENT,
     lambda d: container_of(d).update(imagePullPolcy="Always"), "imagePullPolcy"),
    ("memory limit not a quantity", DEPLOYMENT,
     lambda d: container_of(d)["resources"]["limits"].update(memory=["2Gi"]), "memory"),
    ("service selects other pods", SERVICE,
     lambda d: d["spec"]["selector"].update({"app.kubernetes.io/name": "mcdropp"}),
     "does not match the pods"),
    ("deployment selector misses its pods", DEPLOYMENT,
     lambda d: d["spec"]["selector"]["matchLabels"].update(tier="web"), "its pod labels"),
    ("service targetPort undeclared", SERVICE,
     lambda d: d["spec"]["ports"][0].update(targetPort="web"), "targetPort 'web'"),
    ("readiness on a path the app lacks", DEPLOYMENT,
     lambda d: container_of(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
     "path /healthz is not a GET route"),
    ("liveness on readiness", DEPLOYMENT,
     lambda d: container_of(d)["livenessProbe"]["httpGet"].update(path=ROUTES.ready),
     "livenessProbe probes"),
    ("probe port undeclared", DEPLOYMENT,
     lambda d: container_of(d)["readinessProbe"]["httpGet"].update(port="metrics"),
     "readinessProbe port 'metrics'"),
    ("no readiness probe", GPU,
     lambda d: container_of(d).pop("readinessProbe"), "no readinessProbe"),
    ("hpa targets another deployment", HPA,
     lambda d: d["spec"]["scaleTargetRef"].update(name="mcdrop-cpu"), "names no Deployment"),
    ("deployment fixes replicas under an hpa", DEPLOYMENT,
     lambda d: d["spec"].update(replicas=3), "spec.replicas"),
    ("cpu target without cpu requests", DEPLOYMENT,
     lambda d: container_of(d)["resources"]["requests"].pop("cpu"), "no cpu requests"),
    ("pdb selects other pods", PDB,
     lambda d: d["spec"]["selector"]["matchLabels"].update(tier="web"), "does not match the pods"),
    ("pdb blocks every eviction", PDB,
     lambda d: (d["spec"].pop("maxUnavailable"), d["spec"].update(minAvailable=2)), "evicted"),
    ("scrape port undeclared", DEPLOYMENT,
     lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
         {"prometheus.io/port": "9090"}), "prometheus.io/port '9090'"),
    ("scrape path wrong", KSERVE,
     lambda d: d["metadata"]["annotations"].update({"prometheus.kserve.io/path": "/stats"}),
     "prometheus.kserve.io/path '/stats'"),
    ("misspelt setting", DEPLOYMENT,
     lambda d: rename_env(d, "MCDROP_DEVICE", "MCDROP_DEVCE"), "MCDROP_DEVCE is not a setting"),
    ("invalid setting value", DEPLOYMENT,
     lambda d: set_env(d, "MCDROP_DEVICE", "tpu"), "invalid MCDROP_* value"),
    ("server port is not the container port", KSERVE,
     lambda d: set_env(d, "MCDROP_PORT", "8080"), "MCDROP_PORT=8080"),
    ("server bound to loopback", DEPLOYMENT,
     lambda d: set_env(d, "MCDROP_HOST", "127.0.0.1"), "MCDROP_HOST=127.0.0.1"),
    ("gpu pod on cpu", GPU, lambda d: set_env(d, "MCDROP_DEVICE", "cpu"), "nvidia.com/gpu limit"),
    ("more threads than cores", DEPLOYMENT,
     lambda d: set_env(d, "OMP_NUM_THREADS", "8"), "OMP_NUM_THREADS=8 exceeds"),
    ("root pod", DEPLOYMENT,
     lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
     "pod runAsUser 0"),
    ("root container", KSERVE,
     lambda d: container_of(d)["securityContext"].update(runAsUser=0), "container runAsUser 0"),
    ("may run as root", GPU,
     lambda d: container_of(d)["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    ("writable root filesystem", GPU,
     lambda d: container_of(d)["securityContext"].update(readOnlyRootFilesystem=False),
     "readOnlyRootFilesystem should be True"),
    ("capabilities kept", KSERVE,
     lambda d: container_of(d)["securityContext"].pop("capabilities"), "do not drop ALL"),
    ("no /tmp volume", DEPLOYMENT,
     lambda d: container_of(d).pop("volumeMounts"), "/tmp is not a writable emptyDir"),
    ("grace shorter than the drain", DEPLOYMENT,
     lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20),
     "terminationGracePeriodSeconds 20"),
    ("another image", DEPLOYMENT,
     lambda d: container_of(d).update(image="mcdrop:latest"), "image mcdrop:latest"),
    ("kserve container renamed", KSERVE,
     lambda d: container_of(d).update(name="predictor"), "named kserve-container"),
    ("kserve protocol unknown", KSERVE,
     lambda d: set_env(d, "PROTOCOL", "v3"), "PROTOCOL='v3'"),
    ("kserve protocol v1", KSERVE, lambda d: set_env(d, "PROTOCOL", "v1"), "PROTOCOL must be v2"),
    ("kserve misspelt predictor field", KSERVE,
     lambda d: d["spec"]["predictor"].update(minReplica=1), "minReplica"),
    ("kserve framework beside containers", KSERVE,
     lambda d: d["spec"]["predictor"].update(sklearn={"storageUri": "s3://m"}),
     "should not be valid"),
    ("kserve unknown deployment mode", KSERVE,
     lambda d: d["metadata"]["annotations"].update(
         {"serving.kserve.io/deploymentMode": "Raw"}), "'Raw' is not one of"),
    ("kserve replicas inverted", KSERVE,
     lambda d: d["spec"]["predictor"].update(minReplicas=12), "minReplicas 12 > maxReplicas"),
    ("ray v1alpha1 field", RAY, lambda d: d["spec"].update(serveConfig={}), "serveConfig"),
    ("ray head template typo", RAY,
     lambda d: ray_cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0].update(
         imagePullPolcy="Always"), "head: spec.containers.0: Additional properties"),
    ("ray worker group without name", RAY,
     lambda d: ray_cluster(d)["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    ("ray start param not a string", RAY,
     lambda d: ray_cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "num-cpus"),
    ("ray worker replicas out of bounds", RAY,
     lambda d: ray_cluster(d)["workerGroupSpecs"][0].update(replicas=9),
     "minReplicas <= replicas <= maxReplicas"),
    ("serve config typo", RAY, edit_serve_config("http_options:", "http_option:"), "http_option"),
    ("serve config not yaml", RAY, edit_serve_config("applications:", "applications: ["),
     "not YAML"),
    ("serve app elsewhere", RAY,
     edit_serve_config(RAY_IMPORT_PATH, "mcdrop.app:create_app"), "import_path"),
    ("serve app under a prefix", RAY, edit_serve_config("route_prefix: /", "route_prefix: /mc"),
     "route_prefix"),
    ("serve port not the head's", RAY, edit_serve_config("port: 8000", "port: 9000"),
     "Serve http port 9000"),
    ("replica bigger than a worker", RAY, edit_serve_config("num_cpus: 2", "num_cpus: 3"),
     "fits on no worker"),
    ("replicas beyond the workers", RAY, edit_serve_config("replicas: 2", "replicas: 5"),
     "worker CPUs"),
    ("gpu replicas on cpu workers", RAY, edit_serve_config("num_gpus: 0", "num_gpus: 1"),
     "num_gpus"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "change", "expected"),
    [pytest.param(path, change, expected, id=name) for name, path, change, expected in BROKEN],
)
def test_a_broken_copy_is_rejected(
    path: str, change: Callable[[Doc], object], expected: str
) -> None:
    broken = all_problems(mutated(manifests(), path, change))
    assert any(expected in problem for problem in broken), broken


# -- agreement with files that other parts of the project own ----------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\s*\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def test_manifests_agree_with_the_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    steps = dockerfile_instructions(text)
    (user, *_) = [args for name, args in reversed(steps) if name == "USER"] or [""]
    account = user.split(":")[0]
    assert account, "the Dockerfile sets no USER"
    assert account == str(UID) or re.search(rf"(--uid|-u)\s+{UID}\b", text), (
        f"USER {user}: not UID {UID}"
    )
    exposed = {
        int(p.split("/")[0]) for name, args in steps if name == "EXPOSE" for p in args.split()
    }
    defaults: dict[str, str] = {}
    for name, args in steps:
        if name == "ENV":
            defaults.update(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args))
    for site in pod_sites(manifests()):
        for container in containers(site):
            ports = {p["containerPort"] for p in container.get("ports", [])}
            if site.serves_http:
                assert ports <= exposed, f"{site.where}: ports {ports} not EXPOSEd {exposed}"
            env = env_of(container)
            repository = defaults.get("MCDROP_MODEL_REPOSITORY", "").strip('"')
            if repository and "MCDROP_MODEL_REPOSITORY" in env:
                assert env["MCDROP_MODEL_REPOSITORY"] == repository, site.where


def test_ray_service_serves_the_ray_builder() -> None:
    module, _, attribute = RAY_IMPORT_PATH.partition(":")
    assert ROOT / "service" / Path(*module.split(".")).with_suffix(".py") == RAY_MODULE
    # Read, not imported: importing it needs Ray, which the test extra does not install.
    tree = ast.parse(RAY_MODULE.read_text(encoding="utf-8"))
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert attribute in functions, f"{RAY_MODULE} defines no top-level {attribute}()"
    # The builder's own argument check (pure, no Ray): every RayService's args must pass it.
    settings_and_options = importlib.import_module("mcdrop.ray_options").settings_and_options
    for ray_service in of_kind(manifests(), "RayService"):
        for app in serve_config(ray_service.doc)["applications"]:
            settings_and_options(app.get("args", {}))


def test_ray_version_matches_the_ray_extra() -> None:
    extra = PROJECT.get("optional-dependencies", {}).get("ray", [])
    pins = [re.sub(r"^ray(\[[^]]*\])?", "", r).strip() for r in extra if re.match(r"ray\b", r)]
    assert pins, "pyproject.toml has no ray extra pinning ray"
    for ray_service in of_kind(manifests(), "RayService"):
        version = ray_service.doc["spec"]["rayClusterConfig"]["rayVersion"]
        for pin in pins:
            assert version in SpecifierSet(pin), f"rayVersion {version} outside the extra's {pin}"
