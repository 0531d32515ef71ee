"""The blob stores (mesh/blobs.py): the data directory, and S3 against a real S3-protocol server process.

Both implementations pass the same contract; then a whole pipeline runs on S3 with the gateway and annotate
on separate data directories (no shared disk): the upload's audio reaches annotate, and the results reach
the client, only through the bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time

import av
import grpc
import pytest

from posemesh.mesh.blobs import LocalBlobStore, S3BlobStore, open_blob_store
from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import RunningGateway, Workers, auth, make_settings
from tests.helpers import completed_results, decoded_pictures, upload, wait_for


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    server = request.getfixturevalue("s3")
    return S3BlobStore(server.bucket, f"t{time.monotonic_ns()}", server.endpoint_url)


def _file(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_stored_file_reads_back_whole_and_in_chunks(store, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    store.put_file("results/t1/annotated.mp4", _file(tmp_path, "a.mp4", data))
    assert store.size("results/t1/annotated.mp4") == len(data)
    chunks = list(store.read_chunks("results/t1/annotated.mp4", chunk=1 << 20))
    assert b"".join(chunks) == data and max(map(len, chunks)) <= 1 << 20
    store.get_file("results/t1/annotated.mp4", tmp_path / "back.mp4")
    assert (tmp_path / "back.mp4").read_bytes() == data
    with store.local_copy("results/t1/annotated.mp4") as path:
        assert path.read_bytes() == data
    assert (tmp_path / "a.mp4").exists(), "put_file without move keeps the caller's file"


def test_a_missing_blob_is_none_or_file_not_found(store, tmp_path):
    assert store.size("results/nope/x") is None
    with pytest.raises(FileNotFoundError):
        next(store.read_chunks("results/nope/x"))
    with pytest.raises(FileNotFoundError):
        store.get_file("results/nope/x", tmp_path / "x")
    with store.local_copy("results/nope/x") as path:
        assert path is None
    assert store.names("results/nope/") == []


def test_a_moved_file_is_consumed_and_names_list_one_folder(store, tmp_path):
    for name in ("seg-00000000-00000059.jsonl", "seg-00000060-00000119.jsonl"):
        source = _file(tmp_path, name, name.encode())
        store.put_file(f"results/.partial-t2-e0/{name}", source, move=True)
        assert not source.exists()
    store.put_file("results/.partial-t2-e0/deeper/x", _file(tmp_path, "x", b"x"))
    assert store.names("results/.partial-t2-e0/") == ["seg-00000000-00000059.jsonl", "seg-00000060-00000119.jsonl"]


def test_a_folder_is_published_once_and_the_first_publisher_wins(store, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, text in ((first, b"first"), (second, b"second")):
        folder.mkdir()
        (folder / "keypoints.jsonl").write_bytes(text)
    assert not store.is_published("results/t3/")
    assert store.publish_dir("results/t3/", first) is True
    assert store.publish_dir("results/t3/", second) is False
    assert store.is_published("results/t3/")
    assert b"".join(store.read_chunks("results/t3/keypoints.jsonl")) == b"first"
    assert not first.exists() and not second.exists(), "publish_dir consumes the local folder"


def test_delete_prefix_takes_a_folder_or_every_name_that_starts_so(store, tmp_path):
    for key in ("results/.partial-t4-e0/a", "results/.partial-t4-e1/b", "results/.partial-t40-e0/c",
                "results/t4/d", "jobs/t4/upload"):
        store.put_file(key, _file(tmp_path, "f", key.encode()))
    store.delete_prefix("results/.partial-t4-e")
    store.delete_prefix("jobs/t4/")
    assert store.size("results/.partial-t4-e0/a") is None and store.size("results/.partial-t4-e1/b") is None
    assert store.size("jobs/t4/upload") is None
    assert store.size("results/.partial-t40-e0/c") is not None and store.size("results/t4/d") is not None


def test_keys_that_climb_out_are_refused(store, tmp_path):
    for key in ("../escape", "results/../../etc/passwd", "/abs"):
        with pytest.raises(ValueError):
            store.put_file(key, _file(tmp_path, "f", b"x"))


def test_the_blob_url_chooses_the_store(tmp_path):
    assert isinstance(open_blob_store("", tmp_path), LocalBlobStore)
    assert open_blob_store(f"file://{tmp_path}/b", tmp_path).root == tmp_path / "b"
    for bad in ("s3://", "gs://bucket"):
        with pytest.raises(ValueError, match="POSEMESH_BLOB_URL"):
            open_blob_store(bad, tmp_path)


@pytest.fixture(scope="module")
def s3_mesh(broker, triton, s3, tmp_path_factory):
    """A gateway, one worker of each stage and a second annotate, every process on its own data directory,
    meeting only in the bucket. Segments of 10 frames, so a replica taking a task over has some to continue."""
    root = tmp_path_factory.mktemp("s3mesh")
    saved = os.environ.get("POSEMESH_SEGMENT_FRAMES")
    os.environ["POSEMESH_SEGMENT_FRAMES"] = "10"
    gw = RunningGateway(make_settings(broker, root / "gateway", triton_url=triton.url,
                                      group_prefix=f"test{time.monotonic_ns()}", blob_url=s3.blob_url("mesh"),
                                      s3_endpoint_url=s3.endpoint_url))
    workers: dict[str, Workers] = {}
    try:
        for name in ("detect", "pose", "track", "annotate", "annotate-2"):
            workers[name] = Workers(dataclasses.replace(gw.settings, data_dir=root / name), root)
            workers[name].start(name.split("-")[0])
        for w in workers.values():
            w.wait_healthy()
        yield gw, workers, root
    finally:
        for w in workers.values():
            w.stop()
        gw.stop()
        if saved is None:
            os.environ.pop("POSEMESH_SEGMENT_FRAMES", None)
        else:
            os.environ["POSEMESH_SEGMENT_FRAMES"] = saved


@pytest.mark.slow
def test_gateway_and_annotate_share_no_disk_when_the_store_is_s3(s3_mesh, s3, tmp_path):
    """The upload's audio reaches annotate through the bucket, the results reach the client through it;
    deleting the task empties the bucket of it."""
    gw, _workers, root = s3_mesh
    task = upload(gw.stub, clips.synth(tmp_path / "talk.mp4", 30, audio_s=3.0), auth())
    done, video, _keypoints = completed_results(gw.stub, task.task_id, auth())
    artifact = next(a for a in done.artifacts if a.kind == tpb.ARTIFACT_KIND_ANNOTATED_VIDEO)
    assert hashlib.sha256(video).hexdigest() == artifact.sha256
    with av.open(io.BytesIO(video)) as mp4:
        assert mp4.streams.audio, "annotate got the upload's audio from the bucket"
        assert sum(1 for _ in mp4.decode(video=0)) == 30
    assert f"mesh/results/{task.task_id}/annotated.mp4" in s3.keys(f"mesh/results/{task.task_id}/")
    for folder in ("gateway", "annotate", "annotate-2"):  # nothing of the result on any process's disk
        assert not [p for p in (root / folder).rglob("*") if p.is_file() and task.task_id in str(p)], folder
    gw.stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10)
    assert [k for k in s3.keys("mesh/") if task.task_id in k] == []


@pytest.mark.slow
def test_an_annotate_replica_killed_mid_task_is_continued_from_the_bucket_frame_exact(s3_mesh, s3, tmp_path):
    """Two annotate replicas on separate disks: the one writing a task is SIGKILLed after some of its
    segments are in the bucket; the other continues from them, and the result equals an undisturbed run's."""
    gw, workers, _root = s3_mesh
    clip = clips.synth(tmp_path / "long.mp4", 120, fps=10, audio_s=12.0)
    _done, ref_video, ref_keypoints = completed_results(gw.stub, upload(gw.stub, clip, auth()).task_id, auth())
    task = upload(gw.stub, clip, auth())
    prefix = f"mesh/results/.partial-{task.task_id}-e"
    owner = wait_for(lambda: next((name for name in ("annotate", "annotate-2")
                                   if _frames_of(workers[name], task.task_id) >= 30), None),
                     120, 0.05, "an annotate replica to write 30 frames")
    wait_for(lambda: len([k for k in s3.keys(prefix) if k.endswith(".jsonl")]) >= 2, 60, 0.05,
             "segments in the bucket")
    workers[owner].kill()
    done, video, keypoints = completed_results(gw.stub, task.task_id, auth())
    assert keypoints == ref_keypoints
    assert decoded_pictures(video) == decoded_pictures(ref_video)
    assert done.video.frame_count == 120
    assert [k for k in s3.keys(prefix)] == [], "the partial segments are deleted once the result is published"


def _frames_of(workers: Workers, task_id: str) -> int:
    from posemesh.v1 import stage_service_pb2 as spb
    from posemesh.v1 import stage_service_pb2_grpc as spb_grpc

    [(_stage, port, _proc)] = workers.procs
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = spb_grpc.StageServiceStub(ch).GetStatus(spb.GetStatusRequest(), timeout=5)
    except grpc.RpcError:
        return 0
    return next((t.frames_done for t in status.tasks if t.task_id == task_id), 0)
