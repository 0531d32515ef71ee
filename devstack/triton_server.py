"""Start the real `tritonserver` from the pinned `nvidia-pytriton==0.7.0` wheel on our model repository.

The server runs in its own small virtual environment (POSEMESH_TRITON_VENV, default .venv-triton),
because this Triton build's Python backend needs numpy<2 while the rest of posemesh uses numpy 2.
Production uses NVIDIA's Triton container with the TensorRT repository from deploy/tensorrt/ instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from posemesh.devstack.processes import free_ports, group_members, kill_group, stop_process
from posemesh.mesh.models import CPU_REPOSITORY
from posemesh.mesh.settings import REPO_ROOT, env

# Each Python-backend stub (CPU_INSTANCES a model) keeps its tensors in a region of /dev/shm (16 MB here) that
# tritonserver removes when it stops in good order. A server killed (SIGKILL, the OOM killer, a crash), or SIGTERMed
# while it loads its models, leaves its regions behind: a CI run's Triton kills left twelve, 192 MB of the host's
# memory.
# So a server's regions carry a prefix of its own, removed once it is gone, and regions nobody maps are swept
# before a server starts. In a container they go with its /dev/shm.
SHM_DIR = Path("/dev/shm")
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
ORPHAN_MIN_AGE_S = 30.0  # a region last modified more recently is left: a margin, whatever it is made for


def mapped_shm_regions(pids: list[int] | None = None) -> set[Path]:
    """The stubs' regions mapped by these processes (by every process when None)."""
    maps = [Path(f"/proc/{pid}/maps") for pid in pids] if pids is not None else Path("/proc").glob("[0-9]*/maps")
    regions = set()
    for path in maps:
        try:
            text = path.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            if SHM_REGION_PREFIX in line:
                regions.add(Path(line.split(None, 5)[-1].removesuffix(" (deleted)")))
    return regions


def sweep_orphaned_shm_regions(shm_dir: Path = SHM_DIR, min_age_s: float = ORPHAN_MIN_AGE_S) -> list[Path]:
    """Remove the stubs' regions this user owns that no process this one can see maps, last modified at least
    min_age_s ago: what killed servers left. (A process in another PID namespace sharing this /dev/shm, a
    container with --ipc=host, is not seen: a stub whose region went recreates it when it starts again.)
    Returns what it removed."""
    now = time.time()
    return _remove_unmapped(shm_dir, SHM_REGION_PREFIX,
                            keep=lambda info: info.st_uid != os.getuid() or now - info.st_mtime < min_age_s)


def remove_shm_regions_left_by(prefix: str, pgid: int, shm_dir: Path = SHM_DIR, wait_s: float = 5.0) -> list[Path]:
    """What tritonserver removes when it stops in good order, for a server whose stubs name their regions with
    `prefix` (TritonServer.shm_prefix), stopped or killed with its process group `pgid`: once no process of
    the group maps a region any more (SIGKILL takes a moment), its regions that nobody maps. A server SIGTERMed
    while it loads its models, or killed, leaves them. Returns what it removed."""
    deadline = time.monotonic() + wait_s
    while mapped_shm_regions(group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _remove_unmapped(shm_dir, prefix)


def _remove_unmapped(shm_dir: Path, prefix: str, keep=lambda info: False) -> list[Path]:
    """Remove the files under `prefix` in `shm_dir` that no process maps and `keep` (given their stat) spares."""
    shm_dir = shm_dir.resolve()  # /proc's maps name the real path (/dev/shm may be a link to /run/shm)
    regions = list(shm_dir.glob(prefix + "*"))
    if not regions:
        return []  # no need to read every process's maps
    mapped, removed = mapped_shm_regions(), []
    for region in regions:
        try:
            if region in mapped or keep(region.stat()):
                continue
            region.unlink()
            removed.append(region)
        except OSError:  # removed meanwhile
            continue
    return removed


def triton_venv() -> Path:
    return Path(env("TRITON_VENV", str(REPO_ROOT / ".venv-triton")))


@dataclass
class TritonInstall:
    python: Path
    site: Path  # site-packages holding pytriton/
    libdir: str  # the interpreter's LIBDIR: the stub must load this libpython, not Debian's

    @property
    def server_bin(self) -> Path:
        return self.site / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @classmethod
    def find(cls, venv: Path | None = None) -> TritonInstall:
        venv = venv or triton_venv()
        python = venv / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(
                f"no Triton environment at {venv}: run `make venv` (or set POSEMESH_TRITON_VENV)")
        out = subprocess.run(
            [str(python), "-c", "import json, sysconfig, pathlib, pytriton;"
             "print(json.dumps([str(pathlib.Path(pytriton.__file__).parent.parent),"
             " sysconfig.get_config_var('LIBDIR')]))"],
            check=True, capture_output=True, text=True).stdout
        site, libdir = json.loads(out)
        return cls(python, Path(site), libdir)

    def backend_dir(self, into: Path) -> Path:
        """A backends/ folder with the Python backend and the 3.11 stub next to it (as PyTriton does)."""
        python_dir = into / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        src = self.site / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            stub = next((src / "python_backend_stubs").glob("*/triton_python_backend_stub"))
        files = [f for f in (src / "backends" / "python").iterdir() if f.is_file()] + [stub]
        for f in files:
            # Copy then rename: a stub still running from another server cannot be overwritten in place.
            tmp = python_dir / f".{f.name}.tmp"
            shutil.copy2(f, tmp)
            os.replace(tmp, python_dir / f.name)
        return into


class TritonServer:
    """tritonserver on free ports, serving model_repository/ with ONNX files from onnx_dir."""

    def __init__(self, onnx_dir: Path, work_dir: Path, repository: Path = CPU_REPOSITORY,
                 grpc_port: int | None = None, http_port: int | None = None, metrics_port: int | None = None,
                 models: list[str] | None = None, log_path: Path | None = None, ort_threads: int = 1,
                 own_shm: bool = False):
        self.onnx_dir, self.work_dir, self.repository = onnx_dir, work_dir, repository
        spare = iter(free_ports(3))  # three different ports: Triton refuses to share one
        self.grpc_port = grpc_port or next(spare)
        self.http_port = http_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        self.models = models
        self.log_path = log_path
        self.ort_threads = ort_threads
        # A /dev/shm of its own (a mount namespace with a fresh tmpfs; needs root), as in a container
        # without --ipc=host: it cannot see the clients' shared-memory regions.
        self.own_shm = own_shm
        self.proc: subprocess.Popen | None = None
        # The start of its stubs' region names in /dev/shm, this server's own: what it leaves behind when
        # killed is told apart from any other server's (remove_shm_regions_left_by).
        self.shm_prefix = f"{SHM_REGION_PREFIX}{secrets.token_hex(6)}_"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, install: TritonInstall) -> tuple[list[str], dict]:
        backends = install.backend_dir(self.work_dir / "backends")
        # Every model folder (one with a config.pbtxt) by name: `--load-model=*` would also try to load any
        # other folder there, such as a __pycache__ that importing model code once left behind.
        models = self.models or sorted(d.name for d in Path(self.repository).iterdir()
                                       if (d / "config.pbtxt").is_file())
        loads = [f"--load-model={m}" for m in models]
        cmd = [str(install.server_bin), f"--model-repository={self.repository}", f"--backend-directory={backends}",
               "--model-control-mode=explicit", *loads, "--disable-auto-complete-config",
               "--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false",
               "--backend-config=python,shm-default-byte-size=16777216",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--grpc-port={self.grpc_port}", f"--http-port={self.http_port}",
               f"--metrics-port={self.metrics_port}", "--log-verbose=0"]
        libs = install.site / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), install.libdir, env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(install.python.parent), env.get("PATH", "")])
        env["POSEMESH_ONNX_DIR"] = str(self.onnx_dir)
        env["POSEMESH_ORT_THREADS"] = str(self.ort_threads)
        env.pop("PYTHONPATH", None)
        if self.own_shm:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs -o size=1g tmpfs /dev/shm && exec "$@"', "sh", *cmd]
        return cmd, env

    def start(self, timeout: float = 120.0) -> TritonServer:
        install = TritonInstall.find()
        cmd, env = self.command(install)
        if not self.own_shm:
            sweep_orphaned_shm_regions()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet: poll again until the deadline
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver not ready after {timeout}s; see {self.log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, grace=15)
            kill_group(self.proc.pid)
            self._remove_regions()  # tritonserver removes them itself, unless stopped while loading or past the grace

    def kill(self) -> None:
        """What a crash of Triton's container does: tritonserver and its Python-backend stubs die at once.
        (SIGKILL of tritonserver alone leaves its stubs orphaned, each spinning on a core.)"""
        if self.proc:
            kill_group(self.proc.pid)
            self.proc.wait()
            self._remove_regions()  # what tritonserver would have removed, had it stopped

    def _remove_regions(self) -> None:
        if not self.own_shm:  # a /dev/shm of its own went with it
            remove_shm_regions_left_by(self.shm_prefix, self.proc.pid)

    def shm_regions(self) -> set[Path]:
        """The regions of /dev/shm that this server and its stubs map now (none in a /dev/shm of its own). Its
        stubs are in its process group, and may outlive it."""
        if not self.proc or self.own_shm:
            return set()
        return mapped_shm_regions(group_members(self.proc.pid))

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
