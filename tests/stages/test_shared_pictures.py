"""Rings of decoded frames between processes on one host: real files in a real shared memory folder, the
writers and a dying owner in child processes.

The children come from a forkserver, never from a fork of pytest: by the time these tests run, pytest holds the
threads of earlier tests' gRPC channels, and a child forked from it could hang on a lock one of them held (the
project's CI on 77956aa: a forked reader never answered). The children's work is therefore in functions at module
level."""

import fcntl
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from posemesh.mesh.frames import PACED_EVERY
from posemesh.stages.shared_pictures import (
    HEADER_BYTES,
    JPEG_SLOTS_BEYOND_AHEAD,
    MAX_SLOTS,
    PictureKey,
    SharedPictures,
    ring_slots,
    slot_parts,
)

W, H = 64, 48
AHEAD = 32  # how far decoding may run ahead of annotate (MAX_FRAMES_AHEAD)
PICTURE_PART, JPEG_PART = slot_parts(W, H)
BUDGET = HEADER_BYTES + 16 * PICTURE_PART + (AHEAD + JPEG_SLOTS_BEYOND_AHEAD) * JPEG_PART  # 16 pictures, 48 JPEGs


def shared(folder, owner: bool = False) -> SharedPictures:
    return SharedPictures(folder, BUDGET, owner=owner, frames_ahead=AHEAD)


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def taken(pictures: SharedPictures, task_id: str, key: PictureKey, width: int = W, height: int = H):
    """What annotate gets: the picture found and copied out, or None."""
    found = pictures.find(task_id, key, width, height)
    return found.take(np.empty(found.nbytes, np.uint8)) if found is not None else None


def key(index: int, epoch: int = 1, offset: int | None = None) -> PictureKey:
    return PictureKey(epoch, index, index % 4, index if offset is None else offset)


CHILDREN = multiprocessing.get_context("forkserver")
# Each child starts with this module imported (from the repository root, as `make test` runs; elsewhere the forkserver
# cannot import it and each child imports it as it unpickles its work).
CHILDREN.set_forkserver_preload([__name__])


def in_a_child(work, *args) -> multiprocessing.Process:
    child = CHILDREN.Process(target=work, args=args)
    child.start()
    return child


def exit_code_of(work, *args) -> int | None:
    """The child's exit code, or None if it had not ended within 30 s (it is killed then)."""
    child = in_a_child(work, *args)
    child.join(30)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def put_pictures(folder, task_id: str, indices: list[int]) -> None:
    writer = shared(folder)
    for i in indices:
        writer.put(task_id, key(i), picture(i))
    os._exit(0 if writer.put_count == len(indices) else 1)


def put_from_another_process(folder, task_id: str, indices: list[int]) -> None:
    assert exit_code_of(put_pictures, folder, task_id, indices) == 0, \
        "the writer found no ring or could not put every picture"


def own_rings(folder, tasks: list[str], ready, done, owner: bool = False) -> None:
    """An owner that lives until told to go (or is killed): dropping its SharedPictures would close its rings,
    and their locks with them."""
    pictures = shared(folder, owner=owner)
    for task_id in tasks:
        pictures.make(task_id, W, H)
    ready.set()
    done.wait(30)


def owner_of(folder, *tasks: str, owner: bool = False):
    """A live owner of the tasks' rings in a child, and the Event that lets it go (one each: an Event a killed
    child waited on cannot be set)."""
    ready, done = CHILDREN.Event(), CHILDREN.Event()
    child = in_a_child(own_rings, folder, list(tasks), ready, done, owner)
    assert ready.wait(30)
    return child, done


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "pictures"  # tmpfs or not: the same calls; /dev/shm is the default in the stack


def test_a_picture_put_by_another_process_comes_out_identical_once_named_exactly(folder):
    owner = shared(folder)
    owner.make("t1", W, H)
    put_from_another_process(folder, "t1", [0, 1, 2])
    assert np.array_equal(taken(owner, "t1", key(1)), picture(1))
    assert taken(owner, "t1", key(1, epoch=2)) is None  # another run's frame 1
    assert taken(owner, "t1", key(1, offset=99)) is None  # frame 1 at another offset
    assert taken(owner, "t1", key(2), W + 1) is None  # another size
    assert taken(owner, "t2", key(2)) is None  # no ring for that task
    assert (owner.rings["t1"].taken, owner.rings["t1"].missed, owner.taken_count) == (1, 3, 1)


def test_a_picture_found_and_then_written_over_before_it_is_copied_out_is_reported_gone(folder):
    owner = shared(folder)
    owner.make("t1", W, H, frames=4)
    put_from_another_process(folder, "t1", [1])
    found = owner.find("t1", key(1), W, H)
    put_from_another_process(folder, "t1", [5])  # the same slot: pose ran four frames further meanwhile
    assert found.take(np.empty(found.nbytes, np.uint8)) is None
    owner.remove("t1")
    assert found.take(np.empty(found.nbytes, np.uint8)) is None  # and once its ring is closed


def test_a_slot_written_over_by_a_later_frame_no_longer_gives_the_earlier_one(folder):
    owner = shared(folder)
    owner.make("t1", W, H)
    slots = int(next(folder.glob("t1.*")).name.split(".")[1])
    assert slots == 16
    put_from_another_process(folder, "t1", [3, 3 + slots])
    assert taken(owner, "t1", key(3)) is None
    assert np.array_equal(taken(owner, "t1", key(3 + slots)), picture(3 + slots))


def jpeg(index: int, size: int = 5000) -> bytes:
    return np.random.default_rng(1000 + index).integers(0, 256, size, dtype=np.uint8).tobytes()


def put_jpegs(folder, task_id: str, jpegs: dict[int, bytes]) -> None:
    detect = shared(folder)
    for i, data in jpegs.items():
        detect.put_jpeg(task_id, key(i), data)
    os._exit(0 if detect.jpegs_put == len(jpegs) else 1)


def put_jpegs_from_another_process(folder, task_id: str, jpegs: dict[int, bytes]) -> None:
    assert exit_code_of(put_jpegs, folder, task_id, jpegs) == 0, "detect found no ring or could not put every JPEG"


def take_jpegs(folder, task_id: str, keys: list[PictureKey], answers) -> None:
    pose = shared(folder)
    answers.put([pose.jpeg(task_id, k) for k in keys] + [pose.jpegs_taken])


def jpegs_taken_in_another_process(folder, task_id: str, keys: list[PictureKey]) -> list[bytes | None]:
    """What pose gets (a process of its own: record locks are a process's, so the owner's lock would not keep
    a reader in the owner's own process from taking the ring for a dead owner's)."""
    answers = CHILDREN.Queue()
    child = in_a_child(take_jpegs, folder, task_id, keys, answers)
    *got, count = answers.get(timeout=30)
    child.join(30)
    assert count == sum(g is not None for g in got)
    return got


def test_a_jpeg_put_by_detect_comes_out_byte_for_byte_to_pose_and_annotate_once_named_exactly(folder):
    annotate = shared(folder, owner=True)
    annotate.make("t1", W, H)
    put_jpegs_from_another_process(folder, "t1", {0: jpeg(0), 1: jpeg(1, 70), 2: jpeg(2, 1)})
    keys = [key(0), key(1), key(2), key(1, epoch=2), key(1, offset=99), key(3)]
    assert jpegs_taken_in_another_process(folder, "t1", keys) == [jpeg(0), jpeg(1, 70), jpeg(2, 1), None, None, None]
    assert jpegs_taken_in_another_process(folder, "t2", [key(0)]) == [None]  # no ring for that task
    assert annotate.jpeg("t1", key(1)) == jpeg(1, 70) and annotate.jpegs_taken == 1  # the owner reads its own
    assert list(folder.glob("t1.*")), "reading a live owner's ring removed it"


def test_jpegs_have_a_slot_for_every_frame_decoding_may_run_ahead_and_pictures_the_rest_of_the_budget(folder):
    """Detect runs further ahead than pose, at most as far as decoding runs ahead of annotate: it puts frame i + AHEAD's
    JPEG while the ring still holds frame i's picture for annotate and frame i's JPEG for pose; a JPEG goes only when
    one a JPEG ring's length later is put, and a JPEG too big for its room is not put."""
    annotate = shared(folder, owner=True)
    annotate.make("t1", W, H)
    ring = annotate.rings["t1"]
    slots, jpeg_slots = ring.slots, ring.jpeg_slots
    assert (slots, jpeg_slots) == (16, AHEAD + JPEG_SLOTS_BEYOND_AHEAD)
    put_from_another_process(folder, "t1", [3])
    furthest = 3 + AHEAD + PACED_EVERY - 1  # the newest frame decoding may put while annotate has not finished 3
    put_jpegs_from_another_process(folder, "t1", {3: jpeg(3), 3 + slots: jpeg(3 + slots), furthest: jpeg(furthest)})
    assert np.array_equal(taken(annotate, "t1", key(3)), picture(3))
    assert [annotate.jpeg("t1", key(i)) for i in (3, 3 + slots, furthest)] == [jpeg(3), jpeg(3 + slots),
                                                                               jpeg(furthest)]
    put_jpegs_from_another_process(folder, "t1", {3 + jpeg_slots: jpeg(3 + jpeg_slots)})
    assert annotate.jpeg("t1", key(3)) is None  # written over by the frame a JPEG ring later
    assert annotate.jpeg("t1", key(3 + jpeg_slots)) == jpeg(3 + jpeg_slots)
    assert np.array_equal(taken(annotate, "t1", key(3)), picture(3))  # the picture slots are apart
    room = ring.jpeg_room
    put_jpegs_from_another_process(folder, "t1", {6: jpeg(6, room)})
    with pytest.raises(AssertionError, match="could not put every JPEG"):
        put_jpegs_from_another_process(folder, "t1", {5: jpeg(5, room + 1)})
    assert annotate.jpeg("t1", key(5)) is None and annotate.jpeg("t1", key(6)) == jpeg(6, room)


def test_the_jpeg_slots_come_first_out_of_the_budget_and_leave_room_for_two_pictures():
    mb = 1 << 20
    # 1080p in the default 320 MB, decoding at most 64 frames ahead: 80 JPEG slots (50 MB), 45 pictures.
    assert ring_slots(1920, 1080, 0, 320 * mb, 64) == (45, 64 + JPEG_SLOTS_BEYOND_AHEAD)
    # 4K: the JPEGs still all fit, the pictures get what is left.
    assert ring_slots(3840, 2160, 0, 320 * mb, 64) == (5, 64 + JPEG_SLOTS_BEYOND_AHEAD)
    # A short video needs no more slots of either kind than its frames.
    assert ring_slots(1920, 1080, 30, 320 * mb, 64) == (30, 30)
    # Decoding not bounded: as many JPEG slots as a ring may have.
    assert ring_slots(640, 480, 0, 320 * mb, 0) == (MAX_SLOTS, MAX_SLOTS)
    # A budget too small for all the JPEG slots keeps two picture slots and gives the JPEGs the rest.
    pictures, jpegs = ring_slots(1920, 1080, 0, 40 * mb, 64)
    assert pictures == 2 and 0 < jpegs < 64
    # A budget without room for two pictures makes no ring, nor does a nonsensical bound or budget.
    assert ring_slots(1920, 1080, 0, 12 * mb, 64) == (0, 0)
    assert ring_slots(1920, 1080, 0, 320 * mb, -100)[1] == JPEG_SLOTS_BEYOND_AHEAD  # below 0: only the margin
    assert ring_slots(1920, 1080, 0, -1, 64) == (0, 0)


def test_a_file_of_another_layout_is_no_ring(folder):
    """A worker of another version on the same host (its ring laid out otherwise) is neither read nor written."""
    owner = shared(folder, owner=True)
    owner.make("t1", W, H)
    path = owner.rings["t1"].path
    with open(path, "r+b") as f:
        f.write(b"pmring1\0")
    writer = shared(folder)
    writer.put_jpeg("t1", key(0), jpeg(0))
    writer.put("t1", key(0), picture(0))
    assert writer.jpegs_put == writer.put_count == 0 and "t1" not in writer.rings


def test_an_owner_reads_jpegs_from_its_own_rings_only(folder):
    """Annotate without a ring of its own for a task (it does not own the task, or has not made it yet) takes
    nothing from another live replica's ring and keeps no hold on it."""
    child, done = owner_of(folder, "t1", owner=True)
    try:
        put_jpegs_from_another_process(folder, "t1", {0: jpeg(0)})
        annotate = shared(folder, owner=True)
        assert annotate.jpeg("t1", key(0)) is None and "t1" not in annotate.rings
        assert jpegs_taken_in_another_process(folder, "t1", [key(0)]) == [jpeg(0)]  # pose finds it there
    finally:
        done.set()
        child.join(10)


def test_a_ring_has_no_more_slots_than_the_video_has_frames(folder):
    owner = shared(folder)
    owner.make("t1", W, H, frames=5)
    assert [p.name for p in folder.iterdir()] == ["t1.5"]


def test_a_writer_without_a_ring_puts_nothing_and_a_ring_too_big_for_the_budget_is_not_made(folder):
    writer = shared(folder)
    writer.put("t1", key(0), picture(0))
    assert writer.put_count == 0 and not folder.exists()
    owner = shared(folder)
    owner.make("t1", 16 * W, 16 * H)  # one slot would not be worth it
    assert not list(folder.glob("t1.*")) and "t1" not in owner.rings


def test_a_ring_is_removed_by_its_owner_only_while_it_is_the_one_it_made(folder):
    first, second = shared(folder), shared(folder)
    first.make("t1", W, H)
    second.make("t1", W, H)  # the task moved to another replica on this host: a new ring replaces the file
    first.remove("t1")
    assert len(list(folder.glob("t1.*"))) == 1, "the new owner's ring was removed by the old owner"
    second.remove("t1")
    assert not list(folder.glob("t1.*"))


def test_a_dead_owners_ring_is_let_go_and_removed_by_a_writer(folder):
    child, _ = owner_of(folder, "t1")
    writer = shared(folder)
    writer.put("t1", key(0), picture(0))
    assert writer.put_count == 1
    sweeper = shared(folder)
    sweeper.sweep()
    assert list(folder.glob("t1.*")), "a live owner's ring was swept"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    writer.rings["t1"].checked = 0.0  # as if LOOK_AGAIN_S had passed
    writer.put("t1", key(1), picture(1))
    assert writer.put_count == 1 and "t1" not in writer.rings, "a writer kept filling a dead owner's ring"
    assert not list(folder.iterdir()), "the writer that found the owner dead left its ring behind"


def test_a_dead_owners_rings_are_swept_by_the_next_owner_and_a_live_ones_kept(folder):
    (dead, _), (live, live_done) = owner_of(folder, "t1", "t2"), owner_of(folder, "t3")
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.join(10)
        shared(folder).sweep()  # as an annotate replica starting on this host
        assert [p.name.split(".")[0] for p in folder.iterdir()] == ["t3"]
    finally:
        live_done.set()
        live.join(10)


def hold_a_lock(path, length: int, start: int, ready, done) -> None:
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, length, start)
    ready.set()
    done.wait(30)


def test_a_slot_locked_by_a_stopped_writer_is_a_miss_not_a_wait(folder):
    """A pose stopped half way through a copy (SIGSTOP, a paused container) holds the slot's lock: annotate
    gives up on that frame after a few tries and fetches its JPEG instead."""
    owner = shared(folder)
    owner.make("t1", W, H)
    put_from_another_process(folder, "t1", [2])
    ring = owner.rings["t1"]
    ready, done = CHILDREN.Event(), CHILDREN.Event()
    child = in_a_child(hold_a_lock, ring.path, ring.picture_part, ring._picture_at(2), ready, done)
    try:
        assert ready.wait(30)
        started = time.monotonic()
        assert owner.find("t1", key(2), W, H) is None
        assert time.monotonic() - started < 1.0
    finally:
        done.set()
        child.join(10)
    assert np.array_equal(taken(owner, "t1", key(2)), picture(2))  # and found once the writer let go


def test_a_folder_that_cannot_hold_rings_means_no_sharing_and_no_error(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"")
    pictures = shared(not_a_folder)
    pictures.sweep()
    pictures.make("t1", W, H)
    pictures.put("t1", key(0), picture(0))
    assert not pictures.rings and pictures.find("t1", key(0), W, H) is None
