"""deploy/ cannot run here (no Docker engine, no GPU): check that it parses and agrees with the code."""

from __future__ import annotations

import yaml

from posemesh.mesh.models import MODELS
from posemesh.mesh.pipeline import STAGE_NAMES
from posemesh.mesh.settings import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def test_compose_runs_every_stage_and_the_gateway():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(STAGE_NAMES) | {"gateway", "kafka", "triton"} <= set(services)
    for stage in STAGE_NAMES:
        assert services[stage]["command"][:4] == ["python", "-m", "posemesh.stages", stage]


def test_kubernetes_manifests_have_a_deployment_per_stage_with_grpc_probes():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "posemesh.yaml").read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(STAGE_NAMES) | {"gateway", "triton"} <= set(deployments)
    for name in [*STAGE_NAMES, "gateway"]:
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert "grpc" in container["readinessProbe"]


def test_engine_build_script_covers_every_served_model():
    script = (DEPLOY / "tensorrt" / "build_engines.sh").read_text()
    for spec in MODELS.values():
        dims = "x".join(map(str, spec.inputs[0].dims))
        assert f"[{spec.name}]=\"{spec.inputs[0].name}:{dims}\"" in script


# ---------------------------------------------------------------- manifests against the code's real settings

import re  # noqa: E402

from posemesh.mesh.settings import REPO_ROOT as ROOT  # noqa: E402
from posemesh.stages.__main__ import build_parser  # noqa: E402


def env_names_the_code_reads() -> set[str]:
    """Every POSEMESH_* name the server reads: all of them through posemesh.mesh.settings."""
    text = (ROOT / "mesh" / "settings.py").read_text()
    names = set(re.findall(r"\b(POSEMESH_[A-Z0-9_]+)", text))
    names |= {f"POSEMESH_{n}" for n in re.findall(r'_?env\("([A-Z0-9_]+)"', text)}
    names |= {f"POSEMESH_{stage.upper()}_MAX_BATCH" for stage in STAGE_NAMES}  # Settings.max_batch
    for folder in ("mesh", "gateway", "stages", "devstack"):  # names read elsewhere, through settings.env
        for path in (ROOT / folder).rglob("*.py"):
            names |= {f"POSEMESH_{n}" for n in re.findall(r'\benv\("([A-Z0-9_]+)"', path.read_text())}
    return names


def test_no_server_module_reads_a_posemesh_variable_but_the_settings_module():
    readers = []
    for folder in ("mesh", "gateway", "stages", "devstack"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "mesh" / "settings.py":
                continue
            for line in path.read_text().splitlines():
                if re.search(r"(os\.environ|getenv)\b.*POSEMESH_", line):
                    readers.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not readers, readers


def k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "posemesh.yaml").read_text()) if d]


def test_every_setting_the_manifests_give_is_one_the_code_reads():
    known = env_names_the_code_reads()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    given: set[str] = set()
    for service in compose["services"].values():
        given |= {k for k in (service.get("environment") or {}) if k.startswith("POSEMESH_")}
    for doc in k8s_docs():
        if doc["kind"] == "ConfigMap":
            given |= {k for k in doc["data"] if k.startswith("POSEMESH_")}
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                given |= {e["name"] for e in c.get("env", []) if e["name"].startswith("POSEMESH_")}
    assert given and given <= known, f"settings no code reads: {sorted(given - known)}"


def _flag(command: list[str], name: str) -> int:
    args = build_parser().parse_args([str(a) for a in command[3:]])
    return getattr(args, name)


def test_compose_commands_ports_and_health_checks_match_the_code():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for stage in STAGE_NAMES:
        service = services[stage]
        args = build_parser().parse_args([str(a) for a in service["command"][3:]])  # the real argument parser
        assert args.stage == stage and args.control_port and args.metrics_port
        test = service["healthcheck"]["test"]
        assert test[1:4] == ["python", "-m", "posemesh.mesh.health"] and test[4].endswith(f":{args.control_port}")
    gateway = services["gateway"]
    assert gateway["command"] == ["python", "-m", "posemesh.gateway"]
    listen_port = int(gateway["environment"]["POSEMESH_GATEWAY_LISTEN"].rsplit(":", 1)[1])
    assert any(str(p).endswith(f":{listen_port}") for p in gateway["ports"])
    assert gateway["healthcheck"]["test"][4].endswith(f":{listen_port}")
    triton_port = services["gateway"]["environment"]["POSEMESH_TRITON_URL"].rsplit(":", 1)[1]
    assert triton_port == "8001"  # Triton's gRPC port
    from posemesh.mesh.health import main as health_main  # the probe module exists and takes these arguments
    assert health_main(["127.0.0.1:1", "--timeout", "0.2"]) == 1


def test_kubernetes_probes_ports_and_commands_match_the_code():
    docs = k8s_docs()
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["POSEMESH_CONTROL_HOST"] == "0.0.0.0"  # probes come from outside the pod
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for stage in STAGE_NAMES:
        pod = deployments[stage]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        args = build_parser().parse_args([str(a) for a in container["command"][3:]])
        assert container["command"][:3] == ["python", "-m", "posemesh.stages"] and args.stage == stage
        assert container["readinessProbe"]["grpc"]["port"] == args.control_port
        assert container["livenessProbe"]["grpc"]["port"] == args.control_port
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == args.metrics_port
    gateway = deployments["gateway"]["spec"]["template"]
    container = gateway["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    listen_port = int(env["POSEMESH_GATEWAY_LISTEN"].rsplit(":", 1)[1])
    assert container["readinessProbe"]["grpc"]["port"] == listen_port
    assert {p["containerPort"] for p in container["ports"]} == {listen_port, int(env["POSEMESH_GATEWAY_METRICS_PORT"])}
    assert int(gateway["metadata"]["annotations"]["prometheus.io/port"]) == int(env["POSEMESH_GATEWAY_METRICS_PORT"])
    triton = deployments["triton"]["spec"]["template"]["spec"]["containers"][0]
    assert ({p["name"]: p["containerPort"] for p in triton["ports"]}["grpc"]
            == int(config["POSEMESH_TRITON_URL"].rsplit(":", 1)[1]))


def test_the_dockerfile_builds_with_the_tested_install_script_and_no_gui_opencv():
    import tomllib

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "deploy/install-server.sh" in dockerfile and "FROM python:3.11-slim" in dockerfile
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in ["clients/python", *package_dirs.values()]:
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.M), f"the image misses {folder}/"
    # Every package comes through install-server.sh (what tests/test_packaging.py checks): no stray installs.
    installs = re.findall(r"pip install ([^\n&]*)", dockerfile)
    assert all("setuptools" in line for line in installs), installs
    assert "USER" in dockerfile  # not root
