"""The results keep the upload's truth: frame times (variable frame rate), origin, audio, exact size,
rotation, and a size change mid-stream. Generated clips through the real gateway, broker, Triton and
the four workers; the annotated MP4 is read back with PyAV."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import auth, media
from tests.helpers import GIVEN_BOXES, assert_given_boxes_kept, upload, wait_state
from tests.mesh import town_clip
from tests.mp4_craft import damaged_tail

DONE = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


def results(gw, path, tmp_path, options=None):
    task = upload(gw.stub, path, auth(), options=options)
    done = wait_state(gw.stub, task.task_id, auth(), DONE, timeout=240)
    assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
    out = {}
    for kind, name in ((tpb.ARTIFACT_KIND_ANNOTATED_VIDEO, "video"), (tpb.ARTIFACT_KIND_KEYPOINTS, "keypoints")):
        chunks = list(gw.stub.DownloadResult(tpb.DownloadResultRequest(task_id=task.task_id, kind=kind),
                                             metadata=auth()))
        out[name] = b"".join(c.chunk for c in chunks[1:])
    video = tmp_path / f"{path.stem}.annotated.mp4"
    video.write_bytes(out["video"])
    records = [json.loads(line) for line in out["keypoints"].decode().splitlines()]
    return done, video, records


def frame_times(path) -> list[float]:
    with av.open(str(path)) as c:
        return [round(f.time, 4) for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def pipeline_once(shared_pipeline):
    return shared_pipeline


def test_variable_frame_rate_audio_odd_size_and_faststart(pipeline_once, tmp_path):
    """30 frames at 25 fps with a 0.3 s gap after frame 20, a stream starting at 1.5 s (not 0), AAC audio,
    and an odd size. Each frame keeps its time (from the same origin as timestamp_s), the audio comes
    along, the size is exact, and the index (moov) comes before the media so playback starts at once."""
    gw, _workers = pipeline_once
    times = [i / 25 for i in range(21)] + [20 / 25 + 0.3 + k / 25 for k in range(1, 10)]
    clip = clips.synth(tmp_path / "vfr.mp4", 30, size=(641, 361), times=times, audio_s=1.6, start_s=1.5)
    task, video, records = results(gw, clip, tmp_path)
    expected = [round(t, 4) for t in times]
    assert [round(r["timestamp_s"], 4) for r in records] == expected
    assert frame_times(video) == expected  # the MP4 keeps each frame's time, not a constant rate
    with av.open(str(video)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (641, 361)
        assert [f.width for f in c.decode(video=0)][:1] == [641]
    with av.open(str(video)) as c:
        assert c.streams.audio and c.streams.audio[0].codec_context.name == "aac"
        audio_end = max(float(p.pts * p.time_base) for p in c.demux(c.streams.audio[0]) if p.pts is not None)
        assert 1.2 < audio_end < 1.8  # the tone, shifted to the video's origin
    head = video.read_bytes()[:4096]
    assert 0 <= head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head
    assert records[0]["width"] == 641 and records[0]["height"] == 361
    assert task.video.audio_codec == "aac"


@pytest.mark.parametrize("ccw", [90, 180, 270])
def test_rotated_uploads_come_out_upright(pipeline_once, tmp_path, ccw):
    gw, _workers = pipeline_once
    clip = clips.synth(tmp_path / f"rot{ccw}.mp4", 3, size=(320, 180), fps=5, rotation=ccw)
    _task, video, records = results(gw, clip, tmp_path)
    with av.open(str(video)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="bgr24")
    upright = (180, 320) if ccw == 180 else (320, 180)
    assert first.shape[:2] == upright
    assert (records[0]["width"], records[0]["height"]) == (upright[1], upright[0])
    source = clips.source_frames((320, 180))[0].astype(np.float32)
    turn = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}
    wrong = {90: cv2.ROTATE_90_CLOCKWISE, 180: None, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}
    right_diff = np.abs(first - cv2.rotate(source, turn[ccw])).mean()
    wrong_diff = np.abs(first - (cv2.rotate(source, wrong[ccw]) if wrong[ccw] is not None else source)).mean()
    assert right_diff < 0.5 * wrong_diff


def test_resolution_change_mid_stream_is_fitted_not_fatal(pipeline_once, tmp_path):
    gw, workers = pipeline_once
    _task, video, records = results(gw, clips.resolution_change(tmp_path / "change.ts"), tmp_path)
    assert [(r["width"], r["height"]) for r in records] == [(320, 180)] * 5 + [(480, 270)] * 5
    with av.open(str(video)) as c:
        sizes = {(f.width, f.height) for f in c.decode(video=0)}
    assert sizes == {(320, 180)}
    assert len(frame_times(video)) == 10
    assert workers.alive()


def test_avi_with_gaps_completes_with_every_decodable_frame_and_its_audio(pipeline_once, tmp_path):
    gw, _workers = pipeline_once
    _task, video, records = results(gw, clips.avi_with_gaps(tmp_path / "gaps.avi", 20), tmp_path)
    assert [r["index"] for r in records] == list(range(20))
    assert len(frame_times(video)) == 20
    with av.open(str(video)) as c:
        assert c.streams.audio


def test_a_damaged_tail_completes_with_frame_count_and_duration_of_what_was_processed(pipeline_once, tmp_path):
    """The 5-frame clip with its last 40 KB of media zeroed: the probe counts 5 packets, 2 frames decode.
    The completed task's frame_count is the frames every stage processed (the keypoints and the annotated
    MP4 hold 2), its duration_s theirs (2 frames at 5 fps: 0.4 s), and a warning says 3 were skipped."""
    gw, _workers = pipeline_once
    task, video, records = results(gw, damaged_tail(tmp_path / "tail.mp4", 40_000), tmp_path)
    assert task.video.frame_count == len(records) == len(frame_times(video)) == 2
    assert task.video.duration_s == 0.4
    assert [p.frames_total for p in task.progress] == [2] * len(task.progress)
    assert any("3 of the 5 frames" in w for w in task.warnings), task.warnings


def test_exports_of_a_real_task_are_read_by_pycocotools_motmetrics_and_csv(pipeline_once, tmp_path):
    """COCO keypoint results, MOT tracks and CSV of a real task, downloaded with DownloadResult and the CLI,
    each read by the library analysts use and checked against the task's keypoints JSON lines."""
    import csv
    import subprocess
    import sys

    import motmetrics

    from posemesh.mesh.settings import REPO_ROOT
    from posemesh.stages import exports
    from tests.conftest import USERS, settings_env
    from tests.stages.test_exports import coco_ground

    gw, _workers = pipeline_once
    done, _video, records = results(gw, media("mmpose_demo_960x540_5f.mp4"), tmp_path)
    persons = [(r, p) for r in records for p in r["persons"]]
    assert persons, "the clip has people in it"
    kinds = {a.kind: a for a in done.artifacts}
    exported = {tpb.ARTIFACT_KIND_COCO_KEYPOINTS, tpb.ARTIFACT_KIND_MOT_TRACKS, tpb.ARTIFACT_KIND_KEYPOINTS_CSV}
    assert exported <= set(kinds)
    env = settings_env(gw.settings) | {"POSEMESH_ADDRESS": gw.address, "POSEMESH_API_KEY": USERS["alice"]}
    files = {}
    for name in ("coco", "mot", "csv"):
        files[name] = tmp_path / f"export.{name}"
        out = subprocess.run([sys.executable, "-m", "posemesh.cli", "download", done.task_id, name, str(files[name])],
                             env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    assert files["coco"].stat().st_size == kinds[tpb.ARTIFACT_KIND_COCO_KEYPOINTS].size_bytes

    coco = coco_ground(records).loadRes(str(files["coco"]))
    anns = sorted(coco.loadAnns(coco.getAnnIds()), key=lambda a: a["id"])
    assert [(a["image_id"], a["track_id"]) for a in anns] == [(r["index"] + 1, p["track_id"]) for r, p in persons]
    assert all(np.allclose(np.reshape(a["keypoints"], (17, 3)), p["keypoints"]) for a, (_r, p) in zip(anns, persons))

    tracks = motmetrics.io.loadtxt(str(files["mot"]), fmt="mot15-2D")
    assert sorted(tracks.index) == sorted((r["index"] + 1, p["track_id"]) for r, p in persons if p["track_id"] > 0)

    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == exports.CSV_HEADER
    assert [(int(row["index"]), int(row["track_id"])) for row in rows] == [(r["index"], p["track_id"])
                                                                          for r, p in persons]


def annotate_status(workers):
    return stage_status(workers, "annotate")


def stage_status(workers, name: str):
    import grpc

    from posemesh.v1 import stage_service_pb2 as spb
    from posemesh.v1 import stage_service_pb2_grpc as spb_grpc

    [port] = [port for stage, port, _p in workers.procs if stage == name]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return spb_grpc.StageServiceStub(ch).GetStatus(spb.GetStatusRequest(), timeout=5)


def test_a_keypoints_only_task_reads_no_pixels_after_pose(pipeline_once, tmp_path):
    """Annotate draws only for the annotated video (or live viewers): a task that asked for keypoints only
    costs it no JPEG read from the broker, and still gets every frame's keypoints."""
    gw, workers = pipeline_once
    clip = clips.synth(tmp_path / "plain.mp4", frames=24)
    before = annotate_status(workers)
    task = upload(gw.stub, clip, auth(), options=tpb.TaskOptions(outputs=[tpb.ARTIFACT_KIND_KEYPOINTS]))
    done = wait_state(gw.stub, task.task_id, auth(), DONE, timeout=240)
    assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
    assert [a.kind for a in done.artifacts] == [tpb.ARTIFACT_KIND_KEYPOINTS]
    after = annotate_status(workers)
    assert after.frames_processed - before.frames_processed == 24
    assert (after.pixel_frames_read, after.pixel_bytes_read) == (before.pixel_frames_read, before.pixel_bytes_read)
    # The same clip with the annotated video: annotate gets each frame's pixels, decoded by pose on this host
    # (shared pictures), its JPEG left by detect on this host, or read from the broker.
    _done, _video, records = results(gw, clip, tmp_path)
    assert len(records) == 24
    last = annotate_status(workers)
    got = {field: getattr(last, field) - getattr(after, field)
           for field in ("pixel_frames_read", "pictures_shared", "jpegs_shared")}
    assert sum(got.values()) >= 24, got


def test_on_one_host_pose_and_annotate_take_frames_from_the_ring_and_the_broker_serves_each_jpeg_once(
        pipeline_once, tmp_path):
    """Detect, pose and annotate on one host: detect leaves each frame's JPEG in the task's ring in shared memory
    and pose takes it there instead of reading the frame's record from the broker again; annotate takes each
    frame that pose decoded (every frame with persons) instead of decoding it again, and the others' JPEGs. The
    clip is long enough for detect to run far ahead of pose (decoding is bounded only ahead of annotate): the ring
    has a JPEG slot for every frame it may run ahead, so pose still takes them all. The ring is gone once the task
    is."""
    frames = 96
    gw, workers = pipeline_once
    status = {stage: functools.partial(stage_status, workers, stage) for stage in ("detect", "pose", "annotate")}
    before = {stage: get() for stage, get in status.items()}
    done, _video, records = results(gw, town_clip(tmp_path, frames), tmp_path)
    after = {stage: get() for stage, get in status.items()}
    change = {stage: {field: getattr(after[stage], field) - getattr(before[stage], field)
                      for field in ("pictures_shared", "jpegs_shared", "pixel_frames_read")} for stage in after}
    with_persons = sum(1 for r in records if r["persons"])
    assert len(records) == frames and with_persons >= frames - 4
    put, taken = change["pose"]["pictures_shared"], change["annotate"]["pictures_shared"]
    # Detect and pose look for a task's ring every 0.2 s until they find one: at most their first batch (8 frames)
    # can come before annotate made it (in practice none: annotate makes it as the task starts). Pose may run
    # further ahead of annotate than the ring has picture slots (45 of 1080p): annotate then uses the JPEG.
    assert with_persons - 8 <= put <= with_persons and taken <= put
    jpegs_put = change["detect"]["jpegs_shared"]
    assert frames - 8 <= jpegs_put <= frames
    assert jpegs_put - 8 <= change["pose"]["jpegs_shared"] <= jpegs_put
    # Pose read from the broker the frames it did not take (and, while it read ahead, maybe more): none when it
    # took them all.
    pose_read = change["pose"]["pixel_frames_read"]
    assert pose_read >= frames - change["pose"]["jpegs_shared"]
    assert pose_read == 0 or change["pose"]["jpegs_shared"] < frames
    # Annotate read no frame ahead that it then took decoded or as a JPEG.
    assert change["annotate"]["pixel_frames_read"] + change["annotate"]["jpegs_shared"] == frames - taken
    folder = Path(gw.settings.shared_pictures_dir)
    deadline = time.monotonic() + 10
    while list(folder.glob(f"{done.task_id}.*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # removed when annotate hears the task ended
    assert not list(folder.glob(f"{done.task_id}.*"))


def test_sample_fps_analyses_frames_on_the_video_clock_and_says_how_many(pipeline_once, tmp_path):
    """30 frames at 10 fps analysed at 2.5 fps: 8 frames, 0.4 s apart, numbered 0-7, in the keypoints and
    in the annotated video at the same times; the task's frame_count says 8, its duration stays the video's."""
    gw, _workers = pipeline_once
    clip = clips.synth(tmp_path / "sampled.mp4", 30, fps=10)
    done, video, records = results(gw, clip, tmp_path, options=tpb.TaskOptions(sample_fps=2.5))
    times = [round(0.4 * i, 4) for i in range(8)]
    assert [(r["index"], round(r["timestamp_s"], 4)) for r in records] == list(enumerate(times))
    assert frame_times(video) == times
    assert (done.video.frame_count, done.options.sample_fps) == (8, 2.5)
    assert done.video.duration_s == pytest.approx(3.0)
    assert not done.warnings, done.warnings


def test_boxes_given_by_the_client_replace_the_detector(pipeline_once, tmp_path):
    """TaskOptions.given_boxes: each frame's persons are the boxes given for it, clipped to the frame, and
    none where none were given; the task records their summary. A retry with the same idempotency key and
    other boxes is refused; with the same boxes it is the same task."""
    import grpc

    from tests.helpers import upload_requests

    gw, _workers = pipeline_once
    clip = media("mmpose_demo_960x540_5f.mp4")
    given = GIVEN_BOXES
    options = tpb.TaskOptions(given_boxes=[
        tpb.FrameBoxes(frame_index=i, boxes=[tpb.Box(x1=a, y1=b, x2=c, y2=d) for a, b, c, d in corners])
        for i, corners in given.items()])
    task = gw.stub.Upload(upload_requests(clip.read_bytes(), clip.name, options=options, key="given-1"),
                          metadata=auth()).task
    done = wait_state(gw.stub, task.task_id, auth(), DONE, timeout=240)
    assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
    chunks = gw.stub.DownloadResult(tpb.DownloadResultRequest(task_id=task.task_id, kind=tpb.ARTIFACT_KIND_KEYPOINTS),
                                    metadata=auth())
    records = [json.loads(line) for line in b"".join(c.chunk for c in list(chunks)[1:]).decode().splitlines()]
    assert_given_boxes_kept(done, records)
    again = gw.stub.Upload(upload_requests(clip.read_bytes(), clip.name, options=options, key="given-1"),
                           metadata=auth()).task
    assert again.task_id == task.task_id
    other = tpb.TaskOptions()
    other.CopyFrom(options)
    other.given_boxes[0].boxes[0].x1 = 101
    with pytest.raises(grpc.RpcError) as err:
        gw.stub.Upload(upload_requests(clip.read_bytes(), clip.name, options=other, key="given-1"), metadata=auth())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "different options" in err.value.details()
