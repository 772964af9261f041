"""Offline checks of deploy/kubernetes: schemas (built-in kinds and the two CRDs) and pod sites.

Built-in kinds go through kubernetes-validate in strict mode (unknown fields are errors) for one
named Kubernetes version. InferenceService and RayService have no schema there: their own fields
are checked against the small specs below, written from the projects' documentation, and every
pod spec embedded in them is validated as a strict core/v1 Pod, so a typo anywhere is caught.
Import as `from kubernetes_helpers import ...` (tests/ is on sys.path; it has no __init__.py).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33"  # lifecycle.preStop.sleep needs >= 1.30

Doc = dict[str, Any]
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
DNS_LABEL = "^[a-z]([-a-z0-9]*[a-z0-9])?$"


@dataclass
class Manifest:
    """One YAML document of one file under deploy/kubernetes."""

    path: str
    doc: Doc

    @property
    def where(self) -> str:
        return f"{self.path} ({self.doc.get('kind')} {self.doc.get('metadata', {}).get('name')})"


def load_manifests(folder: Path) -> list[Manifest]:
    """Every non-empty YAML document of every *.yaml file below `folder`, in path order."""
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                assert isinstance(doc, dict), f"{path}: a document is not a mapping"
                found.append(Manifest(str(path.relative_to(folder)), doc))
    return found


def strict_problems(doc: Doc, where: str) -> list[str]:
    """kubernetes-validate, strict mode, at KUBERNETES_VERSION: every error, with its path."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        at = ".".join(str(part) for part in error.path)
        return [f"{where}: {at}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{where}: {error.message}"]
    return []


def pod_problems(metadata: Doc, spec: Doc, where: str) -> list[str]:
    """A pod spec embedded in a custom resource, validated as a strict core/v1 Pod."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded", **metadata}}
    return strict_problems({**pod, "spec": spec}, where)


def schema_problems(instance: Any, schema: Doc, where: str) -> list[str]:
    """Every JSON-Schema error of `instance`, each with the path it occurred at."""
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{where}: {'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


# -- KServe InferenceService (serving.kserve.io/v1beta1) ---------------------------------------
# Fields from the API reference https://kserve.github.io/website/latest/reference/api/ and the
# custom-predictor guide https://kserve.github.io/website/latest/modelserving/v1beta1/custom/custom_model/
# (PredictorSpec = one framework *or* an inline PodSpec, plus ComponentExtensionSpec).

KSERVE_EXTENSION = {  # ComponentExtensionSpec
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer", "minimum": 1},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": {"type": "integer", "minimum": 0},
    "timeout": {"type": "integer", "minimum": 1},
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "logger": {"type": "object"},
    "batcher": {"type": "object"},
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
    "deploymentStrategy": {"type": "object"},
}
KSERVE_FRAMEWORKS = ("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx",
                     "huggingface", "pmml", "lightgbm", "paddle", "model")  # fmt: skip
KSERVE_PREDICTOR_EXTRA = ("storageUris", "workerSpec")
KSERVE_CONTAINER = "kserve-container"  # the name KServe looks the custom predictor up by
KSERVE_PROTOCOLS = ("v1", "v2")  # CustomPredictor.validateCustomProtocol
KSERVE_MODES = ("Serverless", "RawDeployment", "ModelMesh")

INFERENCE_SERVICE_SCHEMA: Doc = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63},
                "labels": STRING_MAP,
                "annotations": {
                    **STRING_MAP,
                    "properties": {"serving.kserve.io/deploymentMode": {"enum": KSERVE_MODES}},
                },
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {
                    "type": "object",
                    "properties": KSERVE_EXTENSION,
                    # A custom predictor: containers, and none of the built-in frameworks.
                    "required": ["containers"],
                    "not": {"anyOf": [{"required": [name]} for name in KSERVE_FRAMEWORKS]},
                },
                "transformer": {"type": "object"},
                "explainer": {"type": "object"},
            },
        },
    },
}


def kserve_pod_spec(predictor: Doc) -> Doc:
    """The inline PodSpec of a predictor: everything that is not a KServe extension field."""
    own = set(KSERVE_EXTENSION) | set(KSERVE_FRAMEWORKS) | set(KSERVE_PREDICTOR_EXTRA)
    return {key: value for key, value in predictor.items() if key not in own}


def inference_service_problems(manifest: Manifest) -> list[str]:
    """The documented CRD fields, the inline PodSpec as a strict Pod, the custom-predictor rules."""
    doc, where = manifest.doc, manifest.where
    found = schema_problems(doc, INFERENCE_SERVICE_SCHEMA, where)
    predictor = doc.get("spec", {}).get("predictor")
    if not isinstance(predictor, dict):
        return found
    pod = kserve_pod_spec(predictor)
    found += pod_problems({}, pod, f"{where} predictor")
    containers = pod.get("containers", [])
    names = [c.get("name") for c in containers]
    if names.count(KSERVE_CONTAINER) != 1:
        found.append(f"{where}: predictor needs one container named {KSERVE_CONTAINER}: {names}")
        return found
    container = containers[names.index(KSERVE_CONTAINER)]
    protocol = env_of(container).get("PROTOCOL")
    if protocol not in KSERVE_PROTOCOLS:
        found.append(f"{where}: {KSERVE_CONTAINER} env PROTOCOL={protocol!r}, not one of v1, v2")
    elif protocol != "v2":
        found.append(f"{where}: mcdrop speaks the Open Inference Protocol: PROTOCOL must be v2")
    if len(container.get("ports", [])) != 1:
        found.append(f"{where}: {KSERVE_CONTAINER} must declare exactly one containerPort")
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
    if high and low > high:
        found.append(f"{where}: minReplicas {low} > maxReplicas {high}")
    return found


# -- KubeRay RayService (ray.io/v1) -------------------------------------------------------------
# Fields from the KubeRay API reference https://ray-project.github.io/kuberay/reference/api/
# (RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec) and the RayService guide
# https://docs.ray.io/en/latest/cluster/kubernetes/user-guides/rayservice.html.

POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {}, "spec": {}}}
HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "template": POD_TEMPLATE,
        "rayStartParams": STRING_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "ingressOptions": {"type": "object"},
        "resources": STRING_MAP,
        "labels": STRING_MAP,
    },
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "template": POD_TEMPLATE,
        "rayStartParams": STRING_MAP,
        "scaleStrategy": {"type": "object"},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "suspend": {"type": "boolean"},
        "resources": STRING_MAP,
        "labels": STRING_MAP,
    },
}
RAY_CLUSTER = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": STRING_MAP,
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "upgradeStrategy": {"type": "object"},
        "authOptions": {"type": "object"},
    },
}
RAY_SERVICE_SCHEMA: Doc = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}},
        },
        "spec": {
            "type": "object",
            "required": ["rayClusterConfig", "serveConfigV2"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": RAY_CLUSTER,
                "serveService": {"type": "object"},
                "upgradeStrategy": {"type": "object"},
                "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"},
            },
        },
    },
}

# Ray Serve's config file (ServeDeploySchema), which serveConfigV2 holds as a YAML string:
# https://docs.ray.io/en/latest/serve/production-guide/config.html
SERVE_APPLICATION = {
    "type": "object",
    "required": ["import_path"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "route_prefix": {"type": ["string", "null"], "pattern": "^/"},
        "import_path": {"type": "string", "pattern": r"^[\w.]+[:.]\w+$"},
        "args": {"type": "object"},
        "runtime_env": {"type": "object"},
        "deployments": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "logging_config": {"type": "object"},
        "external_scaler_enabled": {"type": "boolean"},
    },
}
SERVE_CONFIG_SCHEMA: Doc = {
    "type": "object",
    "required": ["applications"],
    "additionalProperties": False,
    "properties": {
        "proxy_location": {"enum": ["Disabled", "HeadOnly", "EveryNode"]},
        "http_options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "root_path": {"type": "string"},
                "request_timeout_s": {"type": "number"},
                "keep_alive_timeout_s": {"type": "integer"},
            },
        },
        "grpc_options": {"type": "object"},
        "logging_config": {"type": "object"},
        "target_capacity": {"type": "number", "minimum": 0, "maximum": 100},
        "applications": {"type": "array", "minItems": 1, "items": SERVE_APPLICATION},
    },
}


def serve_config(doc: Doc) -> Doc:
    """The Ray Serve config a RayService carries as a YAML string (empty if unparsable)."""
    try:
        config = yaml.safe_load(doc.get("spec", {}).get("serveConfigV2", "") or "")
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def ray_service_problems(manifest: Manifest) -> list[str]:
    """The documented CRD fields, the Serve config, and each pod template as a strict Pod."""
    doc, where = manifest.doc, manifest.where
    found = schema_problems(doc, RAY_SERVICE_SCHEMA, where)
    text = doc.get("spec", {}).get("serveConfigV2")
    if isinstance(text, str):
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as error:
            found.append(f"{where}: serveConfigV2 is not YAML: {error}")
        else:
            found += schema_problems(
                serve_config(doc), SERVE_CONFIG_SCHEMA, f"{where} serveConfigV2"
            )
    cluster = doc.get("spec", {}).get("rayClusterConfig", {})
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [
        (f"worker group {g.get('groupName')}", g) for g in cluster.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        template = group.get("template", {})
        found += pod_problems(
            template.get("metadata", {}), template.get("spec", {}), f"{where} {name}"
        )
        low, count, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        bounded = [v for v in (low, count, high) if isinstance(v, int)]
        if bounded != sorted(bounded):
            found.append(f"{where} {name}: needs minReplicas <= replicas <= maxReplicas")
    return found


CUSTOM_RESOURCES = {
    ("serving.kserve.io/v1beta1", "InferenceService"): inference_service_problems,
    ("ray.io/v1", "RayService"): ray_service_problems,
}


def manifest_problems(manifest: Manifest) -> list[str]:
    """Schema problems of one manifest: strict built-in schema, or the CRD checks above."""
    key = (manifest.doc.get("apiVersion"), manifest.doc.get("kind"))
    check = CUSTOM_RESOURCES.get(key)  # type: ignore[arg-type]
    return check(manifest) if check else strict_problems(manifest.doc, manifest.where)


# -- pods, wherever they are declared ----------------------------------------------------------


@dataclass
class PodSite:
    """A pod spec found in a manifest, with what the checks need to know about its owner."""

    where: str
    spec: Doc
    annotations: dict[str, str] = field(default_factory=dict)
    serves_http: bool = True  # mcdrop's own server answers the probes (not Ray's proxy)
    read_only_root: bool = True  # expected readOnlyRootFilesystem


def pod_sites(manifests: list[Manifest]) -> Iterator[PodSite]:
    """Every pod spec: Deployments' templates, the KServe predictor, the Ray head and workers."""
    for manifest in manifests:
        doc, kind = manifest.doc, manifest.doc.get("kind")
        if kind == "Deployment":
            template = doc["spec"]["template"]
            annotations = template.get("metadata", {}).get("annotations", {})
            yield PodSite(manifest.where, template["spec"], annotations)
        elif kind == "InferenceService":
            predictor = doc["spec"]["predictor"]
            annotations = doc["metadata"].get("annotations", {})
            yield PodSite(f"{manifest.where} predictor", kserve_pod_spec(predictor), annotations)
        elif kind == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
            for group in groups:
                name = group.get("groupName", "head")
                # KubeRay adds its own probes to Ray pods; Ray's writes are unverified on a
                # read-only root filesystem (see the comment in the manifest).
                yield PodSite(f"{manifest.where} {name}", group["template"]["spec"],
                              serves_http=False, read_only_root=False)  # fmt: skip


def env_of(container: Doc) -> dict[str, str]:
    """A container's literal environment variables (valueFrom entries are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def port_number(container: Doc, port: int | str) -> int | None:
    """A probe's or Service's port resolved against a container: a number or a port name."""
    for declared in container.get("ports", []):
        if port in (declared.get("containerPort"), declared.get("name")):
            return int(declared["containerPort"])
    return None


def cpu_cores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity in cores: 2, "2", "500m"."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def mutated(manifests: list[Manifest], path: str, change: Any) -> list[Manifest]:
    """A deep copy of the manifests where `change(doc)` altered the (first) document of `path`."""
    copies = copy.deepcopy(manifests)
    target = next(m for m in copies if m.path == path)
    change(target.doc)
    return copies


def image_tag(image: str) -> tuple[str, str]:
    """("mcdrop", "0.1.0-cu128") from "registry.example/mcdrop:0.1.0-cu128"."""
    name, _, tag = image.rpartition(":") if re.search(r":[^/]+$", image) else (image, "", "latest")
    return name.rsplit("/", 1)[-1], tag
