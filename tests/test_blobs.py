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
import pytest

from posemesh.devstack.object_store import CREDENTIALS, LocalS3
from posemesh.mesh.blobs import LocalBlobStore, S3BlobStore, open_blob_store
from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import RunningGateway, Workers, auth, make_settings
from tests.helpers import upload, wait_state

TERMINAL = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # boto3 in this process (the gateway) and in the workers finds them here
    server = LocalS3(log_path=tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


@pytest.mark.slow
def test_gateway_and_annotate_share_no_disk_when_the_store_is_s3(broker, triton, s3, tmp_path):
    """Each process its own data directory: the upload's audio reaches annotate through the bucket, the
    results reach the client through it; deleting the task empties the bucket of it."""
    clip = clips.synth(tmp_path / "talk.mp4", 30, audio_s=3.0)
    gw = RunningGateway(make_settings(broker, tmp_path / "gateway", triton_url=triton.url,
                                      group_prefix=f"test{time.monotonic_ns()}", blob_url=s3.blob_url("mesh"),
                                      s3_endpoint_url=s3.endpoint_url))
    workers = []
    try:
        for stage in ("detect", "pose", "track", "annotate"):
            own = Workers(dataclasses.replace(gw.settings, data_dir=tmp_path / stage), tmp_path)
            own.start(stage)
            workers.append(own)
        for w in workers:
            w.wait_healthy()
        task = upload(gw.stub, clip, auth())
        done = wait_state(gw.stub, task.task_id, auth(), TERMINAL, timeout=180)
        assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
        video = b"".join(c.chunk for c in gw.stub.DownloadResult(
            tpb.DownloadResultRequest(task_id=task.task_id, kind=tpb.ARTIFACT_KIND_ANNOTATED_VIDEO),
            metadata=auth(), timeout=60))
        artifact = next(a for a in done.artifacts if a.kind == tpb.ARTIFACT_KIND_ANNOTATED_VIDEO)
        assert hashlib.sha256(video).hexdigest() == artifact.sha256
        with av.open(io.BytesIO(video)) as mp4:
            assert mp4.streams.audio, "annotate got the upload's audio from the bucket"
            assert sum(1 for _ in mp4.decode(video=0)) == 30
        stored = s3.keys(f"mesh/results/{task.task_id}/")
        assert f"mesh/results/{task.task_id}/annotated.mp4" in stored
        for folder in ("gateway", "annotate"):  # nothing of the result on either process's disk
            assert not [p for p in (tmp_path / folder).rglob("*") if p.is_file() and task.task_id in str(p)
                        and p.suffix in (".mp4", ".jsonl")], folder
        gw.stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10)
        assert [k for k in s3.keys("mesh/") if task.task_id in k] == []
    finally:
        for w in workers:
            w.stop()
        gw.stop()
