"""A local RTSP server for development and tests: cameras from clips, and a relay for live output.

    /usr/bin/python3 devstack/rtsp_server.py --port 8554 [--camera NAME=CLIP.mp4 ...]

Runs with Debian's own python3 (GStreamer's gi bindings live there, not in a virtual environment; see
deploy/system-packages.txt), so it imports nothing of posemesh. Production runs MediaMTX or any RTSP
server that accepts a publish and serves it to players.

- rtsp://HOST:PORT/cam/NAME plays CLIP (H.264 in MP4) as a camera would, in real time, to each viewer from
  its start; the stream ends when the clip does.
- rtsp://HOST:PORT/publish/PATH accepts a publish (RTSP RECORD, H.264), e.g. from the annotate worker, and
  rtsp://HOST:PORT/live/PATH serves what is published there to any number of players while it is being
  published; otherwise the answer is 404 Not Found at once (as MediaMTX answers a path without a publisher):
  a path nobody publishes (a live task's without its secret token, see gateway/lifecycle.py), one whose
  publisher has not sent a keyframe yet, and one whose publisher has gone (its task ended). Paths are made
  on first use.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

H264 = "video/x-h264,stream-format=byte-stream,alignment=au"


def say(message: str) -> None:
    """One line of the server's log (its stdout): publishers coming and going, and the players refused, which is
    what a test whose camera delivered nothing needs to be told apart from a reader that failed."""
    print(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {message}", flush=True)


class Relay:
    """What publishers send on /publish/PATH, handed to every player of /live/PATH.

    Each player gets a media of its own, prepared from the publisher's pictures since its last keyframe
    (kept here): a media cannot describe the stream before it has seen a keyframe's parameter sets, so a
    new player used to wait for the next keyframe to be answered and, since what prepared the media is not
    played, for the one after to see a picture (two keyframe intervals). Now DESCRIBE is answered at once
    and a player sees a picture at the publisher's next keyframe, as with MediaMTX, which answers DESCRIBE
    from the publisher's SDP and sends a reader what arrives after its PLAY."""

    MAX_KEPT = 300  # buffers since the last keyframe: bounds memory when a publisher sends no keyframes

    def __init__(self):
        self.lock = threading.Lock()
        self.sources: dict[str, list] = {}  # path -> appsrc elements of live players' media
        self.since_key: dict[str, list] = {}  # path -> the buffers from the last keyframe on
        self.gone: set[str] = set()  # paths whose publisher left (what its media still lets through is dropped)

    def publishing(self, path: str) -> bool:
        """Whether a publisher is on `path` and has sent a keyframe (what a player's media starts from)."""
        with self.lock:
            return bool(self.since_key.get(path))

    def why_not_published(self, path: str) -> str:
        with self.lock:
            if path in self.gone:
                return "its publisher has gone"
            return "no keyframe from its publisher yet" if path in self.since_key else "nothing published there yet"

    def player_joined(self, path: str, appsrc) -> None:
        with self.lock:
            self._replay(path, appsrc)
            self.sources.setdefault(path, []).append(appsrc)

    def _replay(self, path: str, appsrc) -> None:
        for buffer in self.since_key.get(path, []):
            appsrc.emit("push-buffer", _restamped(buffer))

    def player_left(self, path: str, appsrc) -> None:
        with self.lock:
            if appsrc in self.sources.get(path, []):
                self.sources[path].remove(appsrc)

    def publisher_started(self, path: str) -> None:
        with self.lock:
            self.gone.discard(path)
        say(f"publisher on {path}")

    def publisher_left(self, path: str) -> None:
        """The stream ended: players get an end of stream (RTCP BYE) rather than silence."""
        with self.lock:
            targets = list(self.sources.get(path, []))
            self.since_key.pop(path, None)
            self.gone.add(path)
        say(f"publisher of {path} gone ({len(targets)} players told)")
        for appsrc in targets:
            appsrc.emit("end-of-stream")

    def sample(self, path: str, sample) -> None:
        buffer = sample.get_buffer()
        with self.lock:  # pushed in order with what a joining player is given
            if path in self.gone:
                return
            kept = self.since_key.setdefault(path, [])
            if not buffer.has_flags(Gst.BufferFlags.DELTA_UNIT):
                kept.clear()
            if len(kept) < self.MAX_KEPT and (kept or not buffer.has_flags(Gst.BufferFlags.DELTA_UNIT)):
                kept.append(buffer)
            for appsrc in self.sources.get(path, []):
                appsrc.emit("push-buffer", _restamped(buffer))


def _restamped(buffer):
    copy = buffer.copy()
    copy.pts = copy.dts = Gst.CLOCK_TIME_NONE  # appsrc stamps it with its running time (live)
    return copy


class PublishFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, relay: Relay, path: str):
        super().__init__()
        self.relay, self.path = relay, path
        self.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        self.set_launch(f"( rtph264depay name=depay0 ! h264parse config-interval=-1 ! {H264} ! "
                        "appsink name=sink emit-signals=true sync=false max-buffers=30 drop=true )")
        self.connect("media-configure", self._configure)

    def _configure(self, _factory, media):
        sink = media.get_element().get_by_name_recurse_up("sink")
        sink.connect("new-sample", self._new_sample)
        media.connect("unprepared", lambda _m: self.relay.publisher_left(self.path))

    def _new_sample(self, sink):
        self.relay.sample(self.path, sink.emit("pull-sample"))
        return Gst.FlowReturn.OK


class LiveFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, relay: Relay, path: str):
        super().__init__()
        self.relay, self.path = relay, path
        self.set_shared(False)  # a media per player, each prepared from the last keyframe on (Relay)
        self.set_launch(f"( appsrc name=src is-live=true format=time do-timestamp=true caps={H264} ! "
                        "h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 config-interval=1 )")
        self.connect("media-configure", self._configure)

    def _configure(self, _factory, media):
        src = media.get_element().get_by_name_recurse_up("src")
        self.relay.player_joined(self.path, src)
        media.connect("unprepared", lambda _m: self.relay.player_left(self.path, src))


class CameraFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, clip: str):
        super().__init__()
        # Every viewer gets a playback of its own, from the clip's start, in real time.
        self.set_launch(f'( filesrc location="{clip}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 '
                        "config-interval=1 )")


class OnDemandMounts(GstRtspServer.RTSPMountPoints):
    """Mount points that make /publish/PATH and /live/PATH on first use. GStreamer turns every request's
    URL into a path with make_path before it looks the path up, so this is the place to add it, and to take
    away /live/PATH when nothing is published there: a request for a path without a mount is answered 404
    at once (a live media waiting for a publisher that never comes was answered 503 after 20 s)."""

    def __init__(self, relay: Relay):
        super().__init__()
        self.relay = relay
        self.known: set[str] = set()
        self.lock = threading.Lock()

    def do_make_path(self, url):
        path = url.abspath
        for prefix, factory in (("/publish/", PublishFactory), ("/live/", LiveFactory)):
            if path.startswith(prefix) and len(path) > len(prefix):
                mount = path.split("/stream=")[0].rstrip("/")
                with self.lock:
                    if factory is LiveFactory and not self.relay.publishing(mount[len(prefix):]):
                        say(f"refused {path}: {self.relay.why_not_published(mount[len(prefix):])}")
                        if mount in self.known:
                            self.known.discard(mount)
                            self.remove_factory(mount)
                        return path
                    if mount not in self.known:
                        self.known.add(mount)
                        self.add_factory(mount, factory(self.relay, mount[len(prefix):]))
        return path


def _publish_path(abspath: str) -> str:
    """PATH of /publish/PATH (a request may name its stream: /publish/PATH/stream=0), or ''."""
    if not abspath.startswith("/publish/"):
        return ""
    return abspath.split("/stream=")[0].rstrip("/")[len("/publish/"):]


class Server:
    def __init__(self, port: int, cameras: dict[str, str]):
        self.server = GstRtspServer.RTSPServer()
        self.server.set_address("0.0.0.0")
        self.server.set_service(str(port))
        # Each client on a thread of its own: a player's media waits for data while it prepares, and a
        # publisher's data over TCP arrives through its client; served from one context they wait forever.
        self.server.get_thread_pool().set_max_threads(64)
        self.relay = Relay()
        self.mounts = OnDemandMounts(self.relay)
        self.server.set_mount_points(self.mounts)
        for name, clip in cameras.items():
            self.mounts.add_factory(f"/cam/{name}", CameraFactory(clip))
        self.server.connect("client-connected", self._client_connected)

    def _client_connected(self, _server, client) -> None:
        """A publisher is gone when it says TEARDOWN or its connection closes: its media is unprepared only
        once an end of stream has gone through it, up to 20 s later, and its players must be refused at once."""
        published: set[str] = set()

        def recording(_client, ctx) -> None:
            path = _publish_path(ctx.uri.abspath)
            if path:
                published.add(path)
                self.relay.publisher_started(path)

        def gone(*_args) -> None:
            for path in list(published):
                published.discard(path)
                self.relay.publisher_left(path)

        client.connect("record-request", recording)
        client.connect("teardown-request", gone)
        client.connect("closed", gone)

    def run(self) -> None:
        if self.server.attach(None) == 0:
            sys.exit(f"cannot listen on port {self.server.get_service()}")
        loop = GLib.MainLoop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # handled inside GLib's C loop, where Python's would wait
            GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, lambda *_: loop.quit() or GLib.SOURCE_REMOVE)
        print(f"rtsp server on port {self.server.get_bound_port()}", flush=True)
        loop.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--camera", action="append", default=[], help="NAME=CLIP.mp4 (H.264 in MP4)")
    args = parser.parse_args()
    Gst.init(None)
    cameras = dict(item.split("=", 1) for item in args.camera)
    Server(args.port, cameras).run()


if __name__ == "__main__":
    main()
