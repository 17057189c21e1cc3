"""Deployment files, checked statically: Dockerfiles, Kubernetes manifests, KServe resources.

No Docker engine or cluster is needed: Dockerfiles are parsed, every COPY source must exist,
the installed extras must be pyproject's, and every server command line must be one the
CLI accepts; Kubernetes manifests are validated against the Kubernetes API schemas
(kubernetes-validate, offline) and checked for consistency with the server's flags.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from support import ROOT

from onnxserve.serving.cli import build_parser

DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions(path: Path) -> list[dict]:
    parser = DockerfileParser(fileobj=path.open("rb"))
    return parser.structure


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    return yaml.safe_load(value) if value.startswith("[") else shlex.split(value)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile(name: str) -> None:
    steps = _instructions(DEPLOY / name)
    stages = [i for i, s in enumerate(steps) if s["instruction"] == "FROM"]
    assert len(stages) == 2, "multi-stage: a build stage and a runtime stage"
    runtime = steps[stages[-1]:]
    for step in steps:
        if step["instruction"] == "COPY" and "--from" not in step["value"]:
            *sources, _target = shlex.split(step["value"])
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY source {source} is missing"
    installs = " ".join(s["value"] for s in steps if s["instruction"] == "RUN")
    extras = re.findall(r'pip install "?\.\[([\w,]+)\]', installs)
    assert set(",".join(extras).split(",")) - {""} <= set(PYPROJECT["project"][
        "optional-dependencies"])
    assert "export" not in ",".join(extras)  # no TensorFlow in a serving image
    assert ("gpu" in extras) == name.endswith(".gpu")
    user = [s["value"] for s in runtime if s["instruction"] == "USER"]
    assert user and user[-1] not in ("root", "0")
    exposed = " ".join(s["value"] for s in runtime if s["instruction"] == "EXPOSE").split()
    (health,) = [s["value"] for s in runtime if s["instruction"] == "HEALTHCHECK"]
    health_cmd = _exec_form(health.split("CMD", 1)[1])
    assert health_cmd[:2] == ["onnxserve", "health"]
    build_parser().parse_args(health_cmd[1:])
    (entry,) = [_exec_form(s["value"]) for s in runtime if s["instruction"] == "ENTRYPOINT"]
    (cmd,) = [_exec_form(s["value"]) for s in runtime if s["instruction"] == "CMD"]
    assert entry[0] == "onnxserve"
    args = build_parser().parse_args([*entry[1:], *cmd])
    assert str(args.model_repository) == "/models" and args.grpc_host == "0.0.0.0"
    # HTTP/REST, gRPC and metrics, all on the address above
    assert sorted(exposed) == sorted(str(p) for p in (args.http_port, args.grpc_port,
                                                      args.metrics_port))
    assert args.http_port == 8000 and args.grpc_port == 8001
    assert [s["value"] for s in runtime if s["instruction"] == "VOLUME"] == ["/models"]
    # the `docker run` shown in the file's header publishes every exposed port
    (run,) = [line for line in (DEPLOY / name).read_text().splitlines()
              if line.startswith("#") and "docker run" in line]
    published = re.findall(r"-p (\d+):(\d+)", run)
    assert sorted(inside for _, inside in published) == sorted(exposed), run


def test_the_docs_docker_run_publishes_every_port() -> None:
    exposed = {"8000", "8001", "8002"}
    runs = [line for line in (ROOT / "docs" / "deploying.md").read_text().splitlines()
            if line.startswith("docker run")]
    assert runs
    for run in runs:
        assert {inside for _, inside in re.findall(r"-p (\d+):(\d+)", run)} == exposed, run


def _documents(folder: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}" if "metadata" in doc
                 else path.name] = doc
    return docs


def _merge(base: dict, patch: dict) -> dict:
    """A strategic merge for what our overlay patches: maps merge, containers by name."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "containers":
            by_name = {c["name"]: c for c in out[key]}
            for container in value:
                by_name[container["name"]] = _merge(by_name[container["name"]], container)
            out[key] = list(by_name.values())
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _base() -> dict[str, dict]:
    return _documents(DEPLOY / "kubernetes" / "base")


def _gpu_deployment() -> dict:
    overlay = DEPLOY / "kubernetes" / "overlays" / "gpu"
    patch = yaml.safe_load((overlay / "deployment-gpu.yaml").read_text())
    return _merge(_base()["Deployment/onnxserve"], patch)


def test_kustomizations_list_exactly_their_files() -> None:
    base = DEPLOY / "kubernetes" / "base"
    listed = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in base.glob("*.yaml")
                                    if p.name != "kustomization.yaml")
    overlay = yaml.safe_load((DEPLOY / "kubernetes" / "overlays" / "gpu" /
                              "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    for patch in overlay["patches"]:
        assert (DEPLOY / "kubernetes" / "overlays" / "gpu" / patch["path"]).is_file()


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    resources = [doc for name, doc in _base().items() if name != "kustomization.yaml"]
    resources.append(_gpu_deployment())
    for doc in resources:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployment_agrees_with_the_server(variant: str) -> None:
    deployment = _base()["Deployment/onnxserve"] if variant == "cpu" else _gpu_deployment()
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = build_parser().parse_args(["serve", *container["args"]])
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= sleep + args.drain_seconds + 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port,
                     "metrics": args.metrics_port}
    assert args.http_port == 8000
    assert container["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": ports["grpc"]}  # server "" entry
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    if variant == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert args.providers == "cuda"
    for name, doc in _base().items():
        selector = doc.get("spec", {}).get("selector")
        if doc.get("kind") == "Service":
            assert selector.items() <= labels.items(), name
            for port in doc["spec"]["ports"]:
                assert ports[port["targetPort"]] == port["port"], (name, port)
        if doc.get("kind") == "PodDisruptionBudget":
            assert selector["matchLabels"].items() <= labels.items()
        if doc.get("kind") == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_kserve_runtime_and_inference_service() -> None:
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1",
                                                        "ServingRuntime")
    spec = runtime["spec"]
    assert {"name": "onnx"}.items() <= spec["supportedModelFormats"][0].items()
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container" and container["command"] == ["onnxserve"]
    args = build_parser().parse_args(container["args"])
    assert str(args.model_repository) == "/mnt/models"  # where KServe puts storageUri
    assert args.model_name == "{{.Name}}"  # a single-file storageUri's model: the service's name
    assert spec["grpcDataEndpoint"] == f"port:{args.grpc_port}"
    assert spec["httpDataEndpoint"] == f"port:{args.http_port}"
    # KServe sends V2 over REST by default, to the container's one port (Knative's rule)
    (port,) = container["ports"]
    assert port == {"name": "http1", "containerPort": args.http_port, "protocol": "TCP"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready",
                                                     "port": args.http_port}
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1",
                                                        "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == "onnx"
    assert re.match(r"^(pvc|gs|s3|https?)://", model["storageUri"])
    assert model["protocolVersion"] in spec["protocolVersions"]
    if model["protocolVersion"] == "grpc-v2":  # gRPC needs its port declared, as h2c
        assert model["ports"] == [{"name": "h2c", "containerPort": args.grpc_port,
                                   "protocol": "TCP"}]
    else:  # REST: the runtime's HTTP port
        assert model["protocolVersion"] == "v2" and "ports" not in model


def test_the_services_expose_http() -> None:
    (service,) = [doc for name, doc in _base().items() if name == "Service/onnxserve"]
    ports = {p["name"]: (p["port"], p.get("appProtocol")) for p in service["spec"]["ports"]}
    assert ports["http"] == (8000, "http") and ports["grpc"] == (8001, "grpc")
