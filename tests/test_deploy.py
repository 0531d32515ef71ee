"""deploy/ checked without a cluster or a built image: Compose, the Dockerfile and its .dockerignore against
the code. Building and running the image is not done here yet (issue 23, item 1)."""

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
    assert "deploy/install-server.sh" in dockerfile
    # The base is a build argument (a locally built base where no registry is reachable), the official
    # image by default, and both stages use it (the venv is copied between them: same Python).
    assert re.search(r"^ARG BASE=python:3\.11-slim$", dockerfile, re.M)
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${BASE}", "${BASE}"]
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in ["clients/python", *package_dirs.values()]:
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.M), f"the image misses {folder}/"
    # Every package comes through install-server.sh (what tests/test_packaging.py checks): no stray installs.
    installs = re.findall(r"pip install ([^\n&]*)", dockerfile)
    assert all("setuptools" in line for line in installs), installs
    assert "USER" in dockerfile  # not root


# ---------------------------------------------------------------- Compose's secrets and scraping

import subprocess  # noqa: E402


def test_make_secrets_writes_files_the_gateway_accepts_and_never_overwrites(tmp_path):
    from posemesh.gateway.at_rest import SecretBox
    from posemesh.gateway.auth import load_keys

    run = [str(DEPLOY / "make-secrets.sh"), str(tmp_path), "alice"]
    subprocess.run(run, check=True, capture_output=True)
    keys = load_keys("", str(tmp_path / "api_keys.txt"))
    assert list(keys.values()) == ["alice"] and len(next(iter(keys))) >= 40
    SecretBox.from_file(tmp_path / "secrets.key")  # a valid Fernet key
    before = (tmp_path / "api_keys.txt").read_text(), (tmp_path / "secrets.key").read_text()
    subprocess.run(run, check=True, capture_output=True)
    assert ((tmp_path / "api_keys.txt").read_text(), (tmp_path / "secrets.key").read_text()) == before
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {s["file"] for s in compose["secrets"].values()} == {"./api_keys.txt", "./secrets.key"}
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"deploy/api_keys.txt", "deploy/secrets.key"} <= set(ignored)


def test_compose_workers_and_gateway_listen_for_scrapers_on_every_interface():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for name in [*STAGE_NAMES, "gateway"]:
        assert services[name]["environment"]["POSEMESH_CONTROL_HOST"] == "0.0.0.0", name


# ---------------------------------------------------------------- the image's build context


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` (relative to the context) out, by .dockerignore's rules: Go filepath.Match
    patterns plus `**`, a pattern matching a folder excludes what is in it, `!` re-includes, the last match wins."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        if any(regex(pattern).fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_the_dockerignore_keeps_what_the_dockerfile_copies_and_leaves_out_the_heavy_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    sources = [src for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M) for src in line.split()[:-1]]
    assert "clients/python" in sources and "deploy/install-server.sh" in sources
    tracked = subprocess.run(["git", "ls-files", "--", *sources], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(tracked) > 50
    left_out = [path for path in tracked if dockerignore_excludes(patterns, path)]
    assert not left_out, f"the image build needs these, .dockerignore leaves them out: {left_out}"
    for heavy in (".venv/bin/python", ".venv-triton/lib/x.py", ".git/HEAD", "run/onnx/yolox.onnx", "dist/a.whl",
                  "gateway/__pycache__/server.cpython-311.pyc", "tests/clips.py", "deploy/api_keys.txt",
                  "deploy/secrets.key", "deploy/tensorrt/model_repository/yolox/1/model.plan", "x/clip.mp4"):
        assert dockerignore_excludes(patterns, heavy), heavy
    # the matcher itself: a re-include wins when it comes last
    assert not dockerignore_excludes(["run", "!run/keep"], "run/keep")
