"""deploy/ checked without a cluster or a built image: the Kubernetes manifests against the API schemas of
the supported Kubernetes versions (kubernetes-validate, strict) and the "restricted" Pod Security Standard,
every reference defined, every Service selecting pods; Compose, the Dockerfile and its .dockerignore against
the code. tests/test_image.py builds the image and runs it."""

from __future__ import annotations

import yaml

from posemesh.mesh.models import MODELS
from posemesh.mesh.pipeline import STAGE_NAMES, WORKER_NAMES
from posemesh.mesh.settings import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def test_compose_runs_every_stage_and_the_gateway():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(WORKER_NAMES) | {"gateway", "kafka", "triton"} <= set(services)
    for stage in WORKER_NAMES:
        assert services[stage]["command"][:4] == ["python", "-m", "posemesh.stages", stage]


def test_kubernetes_manifests_have_a_deployment_per_stage_with_grpc_probes():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "posemesh.yaml").read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(WORKER_NAMES) | {"gateway", "triton"} <= set(deployments)
    for name in [*WORKER_NAMES, "gateway"]:
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
    for stage in WORKER_NAMES:
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


def assert_alive_and_ready_probes(container: dict) -> None:
    """Readiness asks whether the process can work now (""); startup and liveness whether it still works at all
    (LIVENESS), or Kubernetes would restart workers while Triton is down and gateways while the broker is."""
    from posemesh.mesh.health import LIVENESS

    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS


def test_kubernetes_probes_ports_and_commands_match_the_code():
    docs = k8s_docs()
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["POSEMESH_CONTROL_HOST"] == "0.0.0.0"  # probes come from outside the pod
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for stage in WORKER_NAMES:
        pod = deployments[stage]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        args = build_parser().parse_args([str(a) for a in container["command"][3:]])
        assert container["command"][:3] == ["python", "-m", "posemesh.stages"] and args.stage == stage
        assert container["readinessProbe"]["grpc"]["port"] == args.control_port
        assert container["livenessProbe"]["grpc"]["port"] == args.control_port
        assert_alive_and_ready_probes(container)
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == args.metrics_port
    gateway = deployments["gateway"]["spec"]["template"]
    container = gateway["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # not those from Secrets
    listen_port = int(env["POSEMESH_GATEWAY_LISTEN"].rsplit(":", 1)[1])
    assert container["readinessProbe"]["grpc"]["port"] == listen_port
    assert container["livenessProbe"]["grpc"]["port"] == listen_port
    assert_alive_and_ready_probes(container)
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


# ---------------------------------------------------------------- Kubernetes: what a cluster accepts and runs

import copy  # noqa: E402
import subprocess  # noqa: E402

import kubernetes_validate  # noqa: E402
import pytest  # noqa: E402

# The Kubernetes versions deploy/k8s/ is validated for (deploy/README.md says the same): every minor from
# 1.30 to the newest kubernetes-validate knows. gRPC probes (GA 1.27), fsGroupChangePolicy (1.23) and the
# Pod Security labels (1.25) are older than all of them.
KUBERNETES_VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37"]
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"


def all_k8s_docs() -> list[tuple[str, dict]]:
    """(file name, object) for every object of every file under deploy/k8s/."""
    return [(path.name, doc) for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_specs(docs) -> list[tuple[str, dict, dict]]:
    """(kind/name, pod template metadata, pod spec) of every workload."""
    out = []
    for _, doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Pod":
            out.append((f"{kind}/{name}", doc["metadata"], doc["spec"]))
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((f"{kind}/{name}", doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]))
        elif kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            out.append((f"{kind}/{name}", template["metadata"], template["spec"]))
    return out


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_strict_schema_validation(version):
    docs = all_k8s_docs()
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service", "Pod"} <= {
        d["kind"] for _, d in docs}
    for file, doc in docs:
        try:  # strict: a misspelt or misplaced field is an error, not silently dropped by the API server
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file}: {doc['kind']}/{doc['metadata']['name']} for Kubernetes {version}: {exc.message}")


# The "restricted" Pod Security Standard, as the Kubernetes documentation lists its controls (baseline's and
# restricted's own); the namespace also enforces it at admission (deploy/k8s/namespace.yaml).
ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                        "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(metadata: dict, spec: dict) -> list[str]:
    """What in one pod breaks the restricted Pod Security Standard (empty: it passes)."""
    problems = []
    pod_sc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field}: {spec[field]}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: {sorted(kinds - ALLOWED_VOLUME_TYPES)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl['name']}")
    for key, value in (metadata.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value not in (
                "runtime/default", "localhost") and not value.startswith("localhost/"):
            problems.append(f"AppArmor {key}: {value}")

    def context_value(sc: dict, *path):
        for source in (sc, pod_sc):
            value = source
            for key in path:
                value = (value or {}).get(key)
            if value is not None:
                return value
        return None

    for c in containers(spec):
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities {caps['add']}")
        if context_value(sc, "runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if context_value(sc, "runAsUser") == 0:
            problems.append(f"{where}: runAsUser 0")
        if context_value(sc, "seccompProfile", "type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost")
        if (context_value(sc, "appArmorProfile", "type") or "RuntimeDefault") == "Unconfined":
            problems.append(f"{where}: AppArmor Unconfined")
        if (context_value(sc, "seLinuxOptions", "type") or "container_t") not in (
                "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            problems.append(f"{where}: SELinux type")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{where}: hostPort")
    return problems


def test_every_pod_passes_the_restricted_pod_security_standard():
    pods = pod_specs(all_k8s_docs())
    assert len(pods) >= 8
    problems = {name: p for name, metadata, spec in pods if (p := restricted_violations(metadata, spec))}
    assert not problems, problems


def test_the_restricted_check_finds_what_breaks_the_standard():
    _, metadata, good = next(p for p in pod_specs(all_k8s_docs()) if p[0] == "Deployment/gateway")
    assert restricted_violations(metadata, good) == []
    breaks = {
        "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        "allowPrivilegeEscalation": lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "drop ALL": lambda s: s["containers"][0]["securityContext"].pop("capabilities"),
        "runAsNonRoot": lambda s: s["securityContext"].pop("runAsNonRoot"),
        "runAsUser 0": lambda s: s["containers"][0]["securityContext"].update(runAsUser=0),
        "seccompProfile": lambda s: s["securityContext"].pop("seccompProfile"),
        "Unconfined seccomp": lambda s: s["containers"][0]["securityContext"].update(
            seccompProfile={"type": "Unconfined"}),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPID": lambda s: s.update(hostPID=True),
        "hostIPC": lambda s: s.update(hostIPC=True),
        "hostPort": lambda s: s["containers"][0]["ports"][0].update(hostPort=50051),
        "SYS_ADMIN": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
    }
    for what, apply in breaks.items():
        spec = copy.deepcopy(good)
        apply(spec)
        assert restricted_violations(metadata, spec), f"{what} not found"


def test_every_container_has_cpu_and_memory_requests_and_limits():
    for name, _, spec in pod_specs(all_k8s_docs()):
        for c in containers(spec):
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind) or {}), f"{name} {c['name']}: {kind}"
            gpu_request = resources["requests"].get("nvidia.com/gpu")
            assert gpu_request == resources["limits"].get("nvidia.com/gpu"), f"{name}: GPU request != limit"


def test_every_referenced_secret_config_map_and_claim_is_defined():
    docs = all_k8s_docs()
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    wanted: set[tuple[str, str]] = set()
    for _, _, spec in pod_specs(docs):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                wanted.add(("Secret", volume["secret"]["secretName"]))
            if "configMap" in volume:
                wanted.add(("ConfigMap", volume["configMap"]["name"]))
            if "persistentVolumeClaim" in volume:
                wanted.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
            for source in (volume.get("projected") or {}).get("sources", []):
                for kind, key in (("Secret", "secret"), ("ConfigMap", "configMap")):
                    if key in source:
                        wanted.add((kind, source[key]["name"]))
        wanted |= {("Secret", s["name"]) for s in spec.get("imagePullSecrets", [])}
        for c in containers(spec):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    wanted.add(("ConfigMap", source["configMapRef"]["name"]))
                if "secretRef" in source and not source["secretRef"].get("optional"):  # optional: a cloud
                    wanted.add(("Secret", source["secretRef"]["name"]))  # identity may stand in for it
            for env in c.get("env", []):
                ref = env.get("valueFrom") or {}
                if "configMapKeyRef" in ref:
                    wanted.add(("ConfigMap", ref["configMapKeyRef"]["name"]))
                if "secretKeyRef" in ref:
                    wanted.add(("Secret", ref["secretKeyRef"]["name"]))
    assert {("Secret", "posemesh-api-keys"), ("PersistentVolumeClaim", "posemesh-trt-models")} <= wanted
    assert wanted <= defined, f"referenced, not defined: {sorted(wanted - defined)}"


def test_the_gateway_reads_its_secret_files_where_the_secrets_are_mounted():
    docs = all_k8s_docs()
    secrets = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Secret"}
    _, _, spec = next(p for p in pod_specs(docs) if p[0] == "Deployment/gateway")
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounted = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            for key in secrets[secret["secretName"]]["stringData"]:
                mounted[f"{mount['mountPath']}/{key}"] = secret["secretName"]
    assert mounted.get(env["POSEMESH_API_KEYS_FILE"]) == "posemesh-api-keys"
    assert mounted.get(env["POSEMESH_SECRETS_KEY_FILE"]) == "posemesh-secrets-key"


def test_the_example_secrets_fail_closed(tmp_path):
    """Applied by mistake, the placeholders must not open the API with a known key: the gateway refuses them."""
    from posemesh.gateway.auth import KeyConfigError, load_keys
    from posemesh.mesh.at_rest import KeyFileError, SecretBox

    secrets = {d["metadata"]["name"]: d["stringData"] for f, d in all_k8s_docs()
               if f == "secrets.example.yaml" and d["kind"] == "Secret"}
    (tmp_path / "api_keys").write_text(secrets["posemesh-api-keys"]["api_keys"])
    with pytest.raises(KeyConfigError):
        load_keys("", str(tmp_path / "api_keys"))
    (tmp_path / "secrets_key").write_text(secrets["posemesh-secrets-key"]["secrets_key"])
    with pytest.raises(KeyFileError):
        SecretBox.from_file(tmp_path / "secrets_key")


def test_make_secrets_writes_files_the_gateway_accepts_and_never_overwrites(tmp_path):
    from posemesh.gateway.auth import load_keys
    from posemesh.mesh.at_rest import SecretBox

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


def test_selectors_name_the_app_and_select_their_pods():
    docs = all_k8s_docs()
    pods = pod_specs(docs)
    for _, doc in docs:
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert NAME in selector and COMPONENT in selector, doc["metadata"]["name"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            assert NAME in selector and COMPONENT in selector, doc["metadata"]["name"]
            selected = [spec for _, metadata, spec in pods if selector.items() <= metadata["labels"].items()]
            assert selected, f"Service {doc['metadata']['name']} selects no pod"
            for port in doc["spec"]["ports"]:  # a named target port exists in every selected pod
                for spec in selected:
                    names = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
                    assert port["targetPort"] in names, (doc["metadata"]["name"], port)


def test_several_gateways_roll_one_at_a_time_on_the_shared_store():
    """More than one gateway, a new one up before an old one goes, all on the PostgreSQL store of one Secret
    and no volume claim of their own."""
    docs = all_k8s_docs()
    deployments = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Deployment"}
    gateway = deployments["gateway"]["spec"]
    assert gateway["replicas"] >= 2
    assert gateway["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e for e in gateway["template"]["spec"]["containers"][0]["env"]}
    ref = env["POSEMESH_STORE_URL"]["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for f, d in docs if d["kind"] == "Secret"}
    assert secrets[ref["name"]]["stringData"][ref["key"]].startswith("postgresql://")
    assert all("persistentVolumeClaim" not in v for v in gateway["template"]["spec"]["volumes"])


def test_posemesh_pods_run_as_the_image_user_with_a_writable_volume_group():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user and re.search(rf"useradd --uid {user[1]} --gid {user[2]}", dockerfile)
    for name, _, spec in pod_specs(all_k8s_docs()):
        if spec["containers"][0]["image"].startswith("posemesh"):
            sc = spec["securityContext"]
            expected = (int(user[1]), int(user[2]), int(user[2]))
            assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == expected, name


def test_triton_lands_on_a_gpu_node_with_declared_ports_and_http_probes():
    docs = all_k8s_docs()
    _, _, spec = next(p for p in pod_specs(docs) if p[0] == "Deployment/triton")
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for flag, port in (("--http-port", 8000), ("--grpc-port", 8001), ("--metrics-port", 8002)):
        assert f"{flag}={port}" in container["command"]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert ports.get(probe["port"], probe["port"]) == 8000 and probe["path"].startswith("/v2/health/")
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_no_volume_is_shared_between_pods_results_go_to_object_storage():
    """Gateway and annotate meet in the bucket of POSEMESH_BLOB_URL, not on a disk: no claim is
    ReadWriteMany, the only one is the models' (Triton, or its loader), and the gateways and annotate keep
    only emptyDirs. The gateways do not decode uploads: the ingest Deployment does, from the bucket."""
    docs = all_k8s_docs()
    config = next(d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "posemesh")["data"]
    assert config["POSEMESH_BLOB_URL"].startswith("s3://")
    assert config["POSEMESH_INGEST"] == "stage"
    claims = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteOnce"] for c in claims.values()), claims
    users: dict[str, set[str]] = {}
    for name, _, spec in pod_specs(docs):
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                users.setdefault(v["persistentVolumeClaim"]["claimName"], set()).add(name)
    assert set(users) == {"posemesh-trt-models"}
    for part in ("Deployment/annotate", "Deployment/gateway", "Deployment/ingest"):
        spec = next(spec for name, _, spec in pod_specs(docs) if name == part)
        assert [v for v in spec["volumes"] if "emptyDir" not in v and "secret" not in v] == [], part


def test_the_namespace_enforces_the_restricted_standard():
    namespace = next(d for _, d in all_k8s_docs() if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_models_loader_builds_the_plans_build_engines_sh_builds():
    loader = next(d for f, d in all_k8s_docs() if f == "models-loader.yaml" and d["kind"] == "ConfigMap")
    script = loader["data"]["build.sh"]
    for spec in MODELS.values():
        dims = "x".join(map(str, spec.inputs[0].dims))
        assert f"[{spec.name}]=\"{spec.inputs[0].name}:{dims}\"" in script


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
