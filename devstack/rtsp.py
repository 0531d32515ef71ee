"""Starting the local RTSP server (devstack/rtsp_server.py) from posemesh: the server runs under Debian's
python3, where GStreamer's bindings are (deploy/system-packages.txt), so it is started as a process."""

from __future__ import annotations

import subprocess
from pathlib import Path

from posemesh.devstack.processes import free_port, stop_process, wait_for_port

SCRIPT = Path(__file__).resolve().parent / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def available() -> str:
    """'' when the server can run here, else what is missing."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0');"
                            "from gi.repository import GstRtspServer"], capture_output=True, text=True)
    if probe.returncode:
        return "GStreamer's RTSP server is not installed (make system-deps)"
    return ""


def command(port: int, cameras: dict[str, Path] | None = None) -> list[str]:
    cmd = [SYSTEM_PYTHON, str(SCRIPT), "--port", str(port)]
    for name, clip in (cameras or {}).items():
        cmd += ["--camera", f"{name}={clip}"]
    return cmd


class RtspServer:
    """The local RTSP server as a process: cameras at /cam/NAME, publish at /publish/P, play at /live/P."""

    def __init__(self, cameras: dict[str, Path] | None = None, port: int | None = None, log_path: Path | None = None):
        self.cameras, self.log_path = cameras or {}, log_path
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self, timeout: float = 20.0) -> RtspServer:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(command(self.port, self.cameras), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, grace=5)

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["RtspServer", "available", "command"]
