"""Hostile and odd inputs through the public API, against a real gateway and the real broker.

Every refusal asserts its status code, that the message is short and shows no server path, and that
nothing is left behind: no task row, no topic, no file under the gateway's data directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import grpc
import pytest

from posemesh.mesh import kafka
from posemesh.mesh.settings import REPO_ROOT
from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import USERS, auth, media, settings_env
from tests.helpers import make_clip, read_topic, reserved_topics, topics, upload, upload_requests
from tests.mp4_craft import craft, damaged_tail

MP4 = "mmpose_demo_960x540_5f.mp4"


class Snapshot:
    """What the gateway holds before a refused call; `unchanged()` asserts it holds nothing more after."""

    def __init__(self, gw):
        self.gw = gw
        self.tasks = {u: self._tasks(u) for u in USERS}
        self.topics = topics(gw.settings.kafka_bootstrap)

    def _tasks(self, user):
        return {t.task_id
                for t in self.gw.stub.ListTasks(tpb.ListTasksRequest(page_size=100), metadata=auth(user)).tasks}

    def unchanged(self) -> None:
        assert {u: self._tasks(u) for u in USERS} == self.tasks, "a refused call left a task behind"
        left = (topics(self.gw.settings.kafka_bootstrap) - self.topics
                - reserved_topics(self.gw.settings.kafka_bootstrap))
        assert left == set(), "a refused call left a topic"
        jobs = self.gw.settings.jobs_dir
        left = [p for p in jobs.rglob("*") if p.is_file() and p.parent.name not in self.tasks["alice"]]
        assert left == [], f"a refused call left files: {left}"


def refused(gw, code, data: bytes, name: str, **kw) -> str:
    """Upload `data` as `name`; assert the code and a message a person can act on; return it."""
    with pytest.raises(grpc.RpcError) as err:
        gw.stub.Upload(upload_requests(data, name, **kw), metadata=auth())
    assert err.value.code() == code, err.value.details()
    details = err.value.details()
    assert details and len(details) < 400, details
    assert str(gw.settings.data_dir) not in details and "/tmp" not in details, f"server path in {details!r}"
    return details


def canary(tmp_path):
    """A real video on the server's disk that no upload may make the gateway read. Its access time is set
    before its modification time, so any read moves it (relatime)."""
    secret = clips.remux(media(MP4), tmp_path / "secret.ts", "mpegts")
    os.utime(secret, (0, secret.stat().st_mtime))
    return secret


def test_hls_playlist_pointing_at_a_server_file_is_refused_and_reads_nothing(gateway, tmp_path):
    secret = canary(tmp_path)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{secret}\n#EXT-X-ENDLIST\n".encode()
    before = Snapshot(gateway)
    msg = refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, playlist, "x.m3u8")
    assert "MP4" in msg  # says what is accepted
    assert secret.stat().st_atime == 0, "the gateway read a file outside the upload"
    before.unchanged()


def test_concat_script_is_refused_and_reads_nothing(gateway, tmp_path):
    secret = canary(tmp_path)
    before = Snapshot(gateway)
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, f"ffconcat version 1.0\nfile '{secret}'\n".encode(),
            "x.ffconcat")
    assert secret.stat().st_atime == 0
    before.unchanged()


def test_text_file_is_refused(gateway):
    before = Snapshot(gateway)
    text = "".join(f"line {i}: a text FFmpeg would render as video frames\n" for i in range(60)).encode()
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, text, "notes.txt")
    before.unchanged()


def test_subtitles_are_refused(gateway):
    before = Snapshot(gateway)
    srt = "".join(f"{i + 1}\n00:00:0{i},000 --> 00:00:0{i},900\nsubtitle {i}\n\n" for i in range(5)).encode()
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, srt, "movie.srt")
    before.unchanged()


def test_sdp_session_description_is_refused(gateway):
    """An SDP file makes FFmpeg open RTP sockets and wait for a stream."""
    before = Snapshot(gateway)
    sdp = b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=video 5004 RTP/AVP 96\r\n" \
          b"a=rtpmap:96 H264/90000\r\n"
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, sdp, "cam.sdp")
    before.unchanged()


def test_still_image_is_refused(gateway):
    before = Snapshot(gateway)
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, media("coco_000000000785.jpg").read_bytes(), "x.mp4")
    before.unchanged()


def test_animated_gif_is_refused(gateway, tmp_path):
    path = clips.synth(tmp_path / "a.gif", 4, size=(64, 36), codec="gif", pix_fmt="rgb8", fmt="gif")
    before = Snapshot(gateway)
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, path.read_bytes(), "a.gif")
    before.unchanged()


def test_audio_only_file_is_refused(gateway, tmp_path):
    before = Snapshot(gateway)
    msg = refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, clips.audio_only(tmp_path / "a.mkv").read_bytes(), "a.mkv")
    assert "no video stream" in msg
    before.unchanged()


def test_codec_outside_the_allow_list_is_refused(gateway, tmp_path):
    path = clips.synth(tmp_path / "ffv1.mkv", 3, codec="ffv1", pix_fmt="yuv420p", fmt="matroska")
    before = Snapshot(gateway)
    msg = refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, path.read_bytes(), "ffv1.mkv")
    assert "ffv1" in msg and "h264" in msg
    before.unchanged()


def test_oversized_frames_are_refused_before_decoding(gateway, tmp_path):
    """A few kilobytes of Motion-JPEG that decode to 6000x6000 frames (the reported 16000x16000 case grew
    the workers to gigabytes): refused from the header, naming the limit."""
    path = clips.mjpeg_avi(tmp_path / "huge.avi", (6000, 6000))
    assert path.stat().st_size < 2_000_000  # 6000x6000 BGR would be 108 MB a frame
    before = Snapshot(gateway)
    msg = refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, path.read_bytes(), "huge.avi")
    assert "6000x6000" in msg and "4096" in msg
    before.unchanged()


def test_frame_count_duration_and_frame_rate_caps_name_the_limit(gateway_factory, tmp_path):
    gw = gateway_factory(max_frames=10, max_duration_s=1.5, max_fps=25)
    before = Snapshot(gw)
    msg = refused(gw, grpc.StatusCode.INVALID_ARGUMENT,
                  clips.synth(tmp_path / "a.mp4", 12, fps=10).read_bytes(), "many.mp4")
    assert "more than 10 frames" in msg
    msg = refused(gw, grpc.StatusCode.INVALID_ARGUMENT,
                  clips.synth(tmp_path / "b.mp4", 5, fps=2).read_bytes(), "long.mp4")
    assert "limit of 2 s" in msg or "1.5" in msg or "limit of 1" in msg
    msg = refused(gw, grpc.StatusCode.INVALID_ARGUMENT,
                  clips.synth(tmp_path / "c.mp4", 8, fps=50).read_bytes(), "fast.mp4")
    assert "50 frames a second" in msg and "25" in msg
    before.unchanged()


def test_avi_whose_header_declares_more_frames_than_it_holds_is_accepted(gateway, tmp_path):
    """The reported valid AVI was refused as "truncated". Its frames are what decode."""
    path = clips.avi_with_gaps(tmp_path / "gaps.avi", 20)
    task = upload(gateway.stub, path, auth())
    assert task.video.frame_count == 20 and not task.warnings
    records = read_topic(gateway.settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, task.task_id))
    assert sorted(r.frame.index for r in records if r.HasField("frame")) == list(range(20))
    assert [r.end_of_stream.total_frames for r in records if r.HasField("end_of_stream")] == [20]
    gateway.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())


def test_file_cut_in_the_middle_gets_its_frames_and_a_warning(gateway_factory, tmp_path):
    """An MP4 whose index comes first, cut at half its size: its decodable frames, and a warning saying so."""
    gateway = gateway_factory(max_frames_ahead=0)  # no detect worker here to wait for
    full = media("vtest_opencv_480x360.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(full[: len(full) // 2])
    task = upload(gateway.stub, path, auth())
    assert len(task.warnings) == 1 and "ends early" in task.warnings[0] and "795" in task.warnings[0]
    records = read_topic(gateway.settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, task.task_id),
                         timeout=120)
    [eos] = [r.end_of_stream.total_frames for r in records if r.HasField("end_of_stream")]
    assert 300 < eos < 795
    assert sorted(r.frame.index for r in records if r.HasField("frame")) == list(range(eos))
    # The probe counted the packets present (395); once decoding ends the task says what decoded.
    assert task.video.frame_count == 395
    after = gateway.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task
    assert after.video.frame_count == eos and after.video.duration_s == pytest.approx(eos / 10, abs=1e-6)
    if eos < 395:
        assert f"{395 - eos} of the 395 frames of the upload could not be decoded" in " ".join(after.warnings)
    gateway.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())


def test_frame_count_and_duration_become_what_decoded_before_the_stream_ends(gateway_factory, tmp_path):
    """The 5-frame clip with the last 40 KB of its media zeroed: 5 packets, 2 frames. VideoInfo says 5 and
    1.0 s when the upload is accepted (an estimate), then 2 frames and 0.4 s (2 frames at 5 fps), and it
    says so before the end of the stream is on the topic, so before any stage could complete the task."""
    gateway = gateway_factory(max_frames_ahead=0)
    task = upload(gateway.stub, damaged_tail(tmp_path / "tail.mp4", 40_000), auth())
    assert (task.video.frame_count, task.video.duration_s) == (5, 1.0)
    records = read_topic(gateway.settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, task.task_id))
    [eos] = [r.end_of_stream.total_frames for r in records if r.HasField("end_of_stream")]
    assert eos == 2 and sorted(r.frame.index for r in records if r.HasField("frame")) == [0, 1]
    after = gateway.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task
    assert (after.video.frame_count, after.video.duration_s) == (2, 0.4)
    assert after.warnings == ["3 of the 5 frames of the upload could not be decoded and were skipped; the 2 that "
                              "decoded are processed"]
    decode = next(p for p in after.progress if p.stage == "decode")
    assert decode.frames_total == 2
    gateway.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())


def _peak_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def test_mp4s_declaring_millions_of_samples_are_refused_within_a_few_mb_and_leave_nothing(gateway):
    """The issue's file (1,852 bytes here, sample tables declaring 10 million samples: the gateway went
    from 411 MB to 1,119 MB before refusing it), 2 billion sample group entries (1.97 GB in a probe) and a
    movie fragment of 10 million samples (accepted before): refused from their boxes, before FFmpeg. The
    gateway runs in this process, so this process's peak resident size is the gateway's."""
    before = Snapshot(gateway)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak resident size (VmHWM) starts again from the current one
    start = _peak_kb()
    for kind, kw in (("ten-million", {"mdat_bytes": 1000}), ("sgpd", {"count": 2_000_000_000}), ("trun", {})):
        msg = refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, craft(kind, **kw), f"{kind}.mp4")
        assert "declares" in msg and "export it again" in msg, msg
    assert _peak_kb() - start < 32 * 1024
    before.unchanged()


def test_cut_file_without_an_index_is_refused_without_server_paths(gateway):
    clip = media(MP4).read_bytes()  # its index is at the end: cut, nothing can be decoded
    before = Snapshot(gateway)
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, clip[: len(clip) * 2 // 5], "cut.mp4")
    refused(gateway, grpc.StatusCode.INVALID_ARGUMENT, os.urandom(200_000), "random.mp4")
    before.unchanged()


def _expect(code, call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert err.value.details()
    return err.value.details()


def test_malformed_task_ids_are_invalid_argument_and_echoed_short(gateway):
    stub = gateway.stub
    huge = "x" * 10_000
    for call in (lambda r: stub.GetTask(tpb.GetTaskRequest(task_id=r), metadata=auth()),
                 lambda r: stub.CancelTask(tpb.CancelTaskRequest(task_id=r), metadata=auth()),
                 lambda r: stub.DeleteTask(tpb.DeleteTaskRequest(task_id=r), metadata=auth()),
                 lambda r: list(stub.WatchTask(tpb.WatchTaskRequest(task_id=r), metadata=auth())),
                 lambda r: list(stub.DownloadResult(tpb.DownloadResultRequest(task_id=r, kind=1), metadata=auth()))):
        msg = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda call=call: call(huge))
        assert len(msg) < 200 and "10000 characters" in msg
        _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda call=call: call("../../etc/passwd"))
        _expect(grpc.StatusCode.NOT_FOUND, lambda call=call: call("0" * 32))


def test_page_tokens_of_any_size_are_invalid_argument(gateway):
    import base64

    for token in (base64.urlsafe_b64encode(b"o:" + b"9" * 30).decode(), "A" * 10_000, "%%%", "o:5",
                  base64.urlsafe_b64encode(b"o:-1").decode(), base64.urlsafe_b64encode(b"x:1").decode()):
        msg = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda token=token: gateway.stub.ListTasks(
            tpb.ListTasksRequest(page_token=token), metadata=auth()))
        assert "page_token" in msg and len(msg) < 200


def test_reused_idempotency_key_with_another_file_or_options_is_refused(gateway, tmp_path):
    stub = gateway.stub
    clip = media(MP4)
    first = upload(stub, clip, auth(), key="k-1")
    assert upload(stub, clip, auth(), key="k-1").task_id == first.task_id  # a true retry
    before = Snapshot(gateway)
    other = make_clip(media("vtest_opencv_480x360.mp4"), tmp_path / "other.mp4", 5)
    msg = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: upload(stub, other, auth(), key="k-1"))
    assert first.task_id in msg and "different file" in msg
    msg = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: upload(
        stub, clip, auth(), key="k-1", options=tpb.TaskOptions(pose_model=tpb.POSE_MODEL_BLAZEPOSE_FULL)))
    assert "different options" in msg
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: upload(stub, clip, auth(), key="k" * 200))
    before.unchanged()
    # Keys are per user: bob's "k-1" is his own.
    assert upload(stub, other, auth("bob"), key="k-1").task_id != first.task_id


def test_duplicate_authorization_headers_are_refused(gateway):
    both = [("authorization", f"Bearer {USERS['alice']}"), ("authorization", f"Bearer {USERS['bob']}")]
    msg = _expect(grpc.StatusCode.UNAUTHENTICATED,
                  lambda: gateway.stub.ListTasks(tpb.ListTasksRequest(), metadata=both))
    assert "exactly one" in msg
    same = [("authorization", f"Bearer {USERS['alice']}")] * 2
    _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: gateway.stub.ListTasks(tpb.ListTasksRequest(), metadata=same))


def test_gateway_refuses_to_start_without_usable_api_keys(broker, tmp_path):
    """Fails closed: an empty or unreadable keys file, or no keys at all, never means the public dev key."""
    from tests.conftest import make_settings

    empty = tmp_path / "keys"
    empty.write_text("# nobody yet\n")
    cases = {"empty file": {"POSEMESH_API_KEYS": "", "POSEMESH_API_KEYS_FILE": str(empty)},
             "missing file": {"POSEMESH_API_KEYS": "", "POSEMESH_API_KEYS_FILE": str(tmp_path / "nope")},
             "nothing configured": {"POSEMESH_API_KEYS": "", "POSEMESH_API_KEYS_FILE": ""}}
    env = settings_env(make_settings(broker, tmp_path / "data"))
    for case, keys in cases.items():
        proc = subprocess.run([sys.executable, "-m", "posemesh.gateway"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60, env={**env, **keys, "POSEMESH_GATEWAY_LISTEN": "127.0.0.1:0"})
        assert proc.returncode == 2, (case, proc.stderr[-2000:])
        assert "refusing to start" in proc.stderr or "no API keys configured" in proc.stderr, (case, proc.stderr)


def test_parallel_uploads_cannot_exceed_the_active_task_limit(gateway_factory):
    """The limit is checked and reserved when an upload starts, not after it is received."""
    gw = gateway_factory(max_active_tasks_per_user=8)
    data = media(MP4).read_bytes()
    results: list = []

    def one():
        try:
            results.append(
                gw.stub.Upload(upload_requests(data, "x.mp4", chunk=32 * 1024), metadata=auth()).task.task_id)
        except grpc.RpcError as exc:
            results.append(exc.code())

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [r for r in results if isinstance(r, str)]
    assert 1 <= len(created) <= 8, results
    assert all(r == grpc.StatusCode.RESOURCE_EXHAUSTED for r in results if not isinstance(r, str))
    active = gw.stub.ListTasks(tpb.ListTasksRequest(page_size=100), metadata=auth()).tasks
    assert len(active) == len(created) <= 8


def test_av1_is_accepted_and_decoded(gateway, tmp_path):
    """AV1 is on the codec allow-list: the check names the codec (av1), not FFmpeg's decoder (libdav1d)."""
    path = clips.synth(tmp_path / "av1.mp4", 6, codec="libsvtav1")
    task = upload(gateway.stub, path, auth())
    assert task.video.codec == "av1" and task.video.frame_count == 6
    records = read_topic(gateway.settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, task.task_id))
    assert sorted(r.frame.index for r in records if r.HasField("frame")) == list(range(6))
    gateway.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
