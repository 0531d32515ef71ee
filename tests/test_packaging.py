"""The packages users install, built and installed the way users install them, in clean virtual environments:

- the client: `pip install posemesh-*.whl` alone (grpcio, protobuf, tqdm), its CLI driving a real task (served by
  this checkout's gateway and stage workers, with the real broker and Triton);
- the two wheels: each holds its own half of the `posemesh` package and nothing else.

The server's environment (both wheels through deploy/install-server.sh) is tested where users get it: in the
image (tests/test_image.py), whose Dockerfile runs that script.

Nothing of the client here imports the checkout: it runs from its own venv, in a directory outside the repo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from posemesh.devstack.processes import free_port
from posemesh.mesh.pipeline import STAGE_NAMES
from posemesh.mesh.settings import REPO_ROOT
from tests.conftest import make_settings, media, settings_env
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

CLIENT_DISTRIBUTIONS = {"posemesh", "grpcio", "protobuf", "tqdm", "typing-extensions", "pip", "setuptools"}


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", "/")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


def make_venv(path: Path) -> Path:
    # Debian's system python3 makes the venv, not this test's venv: nothing of the dev install leaks in.
    subprocess.run(["python3", "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def installed(python: Path) -> set[str]:
    out = run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"]).stdout
    return {line.split("==")[0].lower().replace("_", "-") for line in out.split()}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """The folder of wheels `make wheel` built (make test passes it), else both built here the same way."""
    if os.environ.get("POSEMESH_WHEELS"):
        return (REPO_ROOT / os.environ["POSEMESH_WHEELS"]).resolve()  # relative to the checkout
    out = tmp_path_factory.mktemp("dist")
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, REPO_ROOT / "clients" / "python",
                 REPO_ROOT])
    assert built.returncode == 0, built.stderr
    return out


def client_wheel(wheels: Path) -> Path:
    return next(wheels.glob("posemesh-[0-9]*.whl"))


def server_wheel(wheels: Path) -> Path:
    return next(wheels.glob("posemesh_server-*.whl"))


@pytest.fixture(scope="module")
def client_python(wheels, tmp_path_factory) -> Path:
    python = make_venv(tmp_path_factory.mktemp("client") / "venv")
    result = run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", client_wheel(wheels)])
    assert result.returncode == 0, result.stderr
    return python


def test_the_client_wheel_holds_no_server_code_and_the_server_wheel_no_client(wheels):
    client = zipfile.ZipFile(client_wheel(wheels)).namelist()
    server = zipfile.ZipFile(server_wheel(wheels)).namelist()
    for names in (client, server):  # nothing generic like `gateway` lands in site-packages
        assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"posemesh"}
    assert {"posemesh/__init__.py", "posemesh/client.py", "posemesh/cli.py",
            "posemesh/v1/task_service_pb2.py"} <= set(client)
    assert not [n for n in client if n.split("/")[1] in ("gateway", "stages", "mesh", "devstack")], client
    assert {"posemesh/gateway/server.py", "posemesh/stages/annotate.py", "posemesh/mesh/settings.py",
            "posemesh/devstack/stack.py"} <= set(server)
    # The server installs into the client's package: it must not replace its __init__ or generated API.
    assert not [n for n in server if n == "posemesh/__init__.py" or n.startswith("posemesh/v1/")], server


def test_the_client_installs_alone_and_server_commands_name_their_extra(client_python):
    assert installed(client_python) <= CLIENT_DISTRIBUTIONS, installed(client_python) - CLIENT_DISTRIBUTIONS
    posemesh = client_python.parent / "posemesh"
    for command in ["submit", "status", "list", "watch", "download", "cancel", "delete", "live", "frames"]:
        result = run([posemesh, command, "--help"])
        assert result.returncode == 0, (command, result.stderr)
    sdk = run([client_python, "-c", "from posemesh.client import Client; Client('127.0.0.1:1').close()"])
    assert sdk.returncode == 0, sdk.stderr
    for command, extra in ((["up"], "posemesh-server[local,models]"),
                           (["run", "x.mp4"], "posemesh-server[local,models]"),
                           (["models", "prepare"], "posemesh-server[models]"),
                           (["models", "verify"], "posemesh-server[models]")):
        result = run([posemesh, *command])
        assert result.returncode == 2 and f"pip install '{extra}'" in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr
    assert run([client_python, "-c", "import gateway"]).returncode != 0  # no generic top-level names
    assert run([client_python, "-c", "import stages"]).returncode != 0
    for server_part in ("posemesh.gateway", "posemesh.stages", "posemesh.mesh", "posemesh.devstack"):
        assert run([client_python, "-c", f"import {server_part}"]).returncode != 0, server_part


def test_the_client_install_drives_a_task(client_python, broker, triton, tmp_path):
    """Gateway and one worker per stage as processes of their own (the containers' commands), a clip submitted,
    watched and downloaded with the client install's CLI."""
    settings = make_settings(broker, tmp_path / "data", triton_url=triton.url, group_prefix=f"pkg{time.monotonic_ns()}")
    env = {**settings_env(settings), "POSEMESH_API_KEYS": "alice:alice-key"}
    env.pop("PYTHONPATH", None)
    server = sys.executable
    gateway_port = free_port()
    procs = [subprocess.Popen([server, "-m", "posemesh.gateway"], cwd=tmp_path, start_new_session=True,
                              env={**env, "POSEMESH_GATEWAY_LISTEN": f"127.0.0.1:{gateway_port}"},
                              stdout=open(tmp_path / "gateway.log", "wb"), stderr=subprocess.STDOUT)]
    ports = [gateway_port]
    for stage in STAGE_NAMES:
        ports.append(free_port())
        procs.append(subprocess.Popen([server, "-m", "posemesh.stages", stage, "--control-port", str(ports[-1])],
                                      cwd=tmp_path, env=env, start_new_session=True,
                                      stdout=open(tmp_path / f"{stage}.log", "wb"), stderr=subprocess.STDOUT))
    try:
        for port in ports:  # the health probe the compose file runs
            wait_for(lambda p=port: run([server, "-m", "posemesh.mesh.health", f"127.0.0.1:{p}"]).returncode == 0,
                     120, 0.5, f"health SERVING on {port}")
        assert all(p.poll() is None for p in procs)
        cli = [client_python.parent / "posemesh", "--address", f"127.0.0.1:{gateway_port}", "--api-key", "alice-key"]
        out = tmp_path / "results"
        submitted = run([*cli, "submit", media("mmpose_demo_960x540_5f.mp4"), "--wait", "--out", out],
                        env={k: v for k, v in os.environ.items() if not k.startswith("POSEMESH_")})
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        task_id = submitted.stdout.split()[0]
        videos = list(out.glob("*.mp4"))
        assert videos and all(v.stat().st_size > 0 for v in videos), list(out.iterdir())
        status = run([*cli, "status", task_id])
        assert status.returncode == 0 and "COMPLETED" in status.stdout.upper(), status.stdout + status.stderr
        assert task_id in run([*cli, "list"]).stdout
        dest = tmp_path / "kp.json"
        assert run([*cli, "download", task_id, "keypoints", dest]).returncode == 0 and dest.stat().st_size > 0
        assert run([*cli, "delete", task_id]).returncode == 0
        gone = run([*cli, "status", task_id])
        assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr.upper().replace(" ", "_"), gone.stderr
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
