"""deploy/ cannot run here (no Docker engine, no GPU): check that it parses and agrees with the code."""

from __future__ import annotations

import yaml

from posemesh.models import MODELS
from posemesh.settings import REPO_ROOT
from posemesh.stages.__main__ import STAGES

DEPLOY = REPO_ROOT / "deploy"


def test_compose_runs_every_stage_and_the_gateway():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(STAGES) | {"gateway", "kafka", "triton"} <= set(services)
    for stage in STAGES:
        assert services[stage]["command"][:4] == ["python", "-m", "posemesh.stages", stage]


def test_kubernetes_manifests_have_a_deployment_per_stage_with_grpc_probes():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "posemesh.yaml").read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(STAGES) | {"gateway", "triton"} <= set(deployments)
    for name in [*STAGES, "gateway"]:
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert "grpc" in container["readinessProbe"]


def test_engine_build_script_covers_every_served_model():
    script = (DEPLOY / "tensorrt" / "build_engines.sh").read_text()
    for spec in MODELS.values():
        dims = "x".join(map(str, spec.inputs[0].dims))
        assert f"[{spec.name}]=\"{spec.inputs[0].name}:{dims}\"" in script
