"""Frames handed between stages on one host: decoded ones from pose to annotate, so a frame's JPEG is decoded in
full once there, and JPEGs from detect to pose and annotate, so the broker serves a frame's JPEG once there.

Pose decodes every frame with persons in full (for its crops); annotate decodes the same JPEG again to draw on
it (and reads it from the broker first). When both run on one host with a shared memory folder (the local
stack; pods or containers that share /dev/shm), annotate makes a ring of picture slots for each task it owns
(a file in that folder, its space reserved up front), pose copies each decoded frame into its slot, and
annotate copies it out instead of fetching and decoding the JPEG: about 1 ms of copying a 1080p frame
against 5 ms of decoding plus the broker's read (bench/README.md has the measurements). The ring also has slots
for frames' JPEGs, as many as decoding may run ahead of annotate (detect runs further ahead than pose): detect,
which reads every frame's record from raw_frames, copies its JPEG there, and pose (and annotate, for a frame pose did
not decode) take it from there instead of reading the record again from the broker.

Nothing depends on it: a frame that is not in the ring (another host's pose did it, pose ran so far ahead that a
later frame took its slot, no persons to decode, no ring at all) is fetched and decoded as before, and gives the
same pixels (the same libjpeg-turbo decode of the same bytes), so results are frame-exact either way; a JPEG
taken from a slot is the record's bytes, named by the record's partition and offset. Any error here (a full or
unwritable folder, a slot locked for too long) is such a miss, never a failure. A slot (picture or JPEG) names the
frame it holds (the run's epoch, index and raw_frames partition and offset) and is read and written under a record
lock on its bytes, released by the kernel if its holder dies mid-copy; a half-written slot names no frame.

Who owns what: the ring belongs to the annotate replica that owns the task on this host. It makes it when it
gets the task's partitions and removes it when the task ends or moves (only its own: a replica that took the
task over on the same host may have made a new one). The owner holds a record lock on the ring's first page
for as long as it lives, so a ring whose lock can be taken is a dead replica's (the kernel dropped the lock
with the process; pids would not do across containers): detect and pose, which only use rings they find, remove
it when they find it so, and every annotate replica sweeps such rings when it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Counter

from posemesh.mesh.frames import PACED_EVERY

# Frames annotate took from a ring ("taken") or had to fetch and decode ("missed"), pictures pose put in one.
PICTURES = Counter("posemesh_shared_pictures_total", "Decoded frames handed over on one host", ["result"])
# JPEGs detect put in a ring, and those pose or annotate took from one or had to fetch from the broker.
JPEGS = Counter("posemesh_shared_jpegs_total", "Frames' JPEGs handed over on one host", ["result"])

log = logging.getLogger("posemesh.stage")

# The file starts with a page its owner keeps locked, which also says how the slots are laid out, then the picture
# slots, then the JPEG slots. Each slot starts with the frame it holds.
SLOT_HEADER = struct.Struct("<qqqqq")  # epoch, index, partition, offset, bytes held (-1: holds nothing)
# At the file's start: the layout's mark, a picture slot's bytes (header included), the JPEG slots' count and bytes,
# a JPEG's room. The mark keeps a worker of another layout from reading the slots at the wrong places.
LAYOUT = struct.Struct("<8sqqqq")
LAYOUT_MARK = b"pmring2\0"
HEADER_BYTES = 4096  # the owner's lock; slots are page-aligned too
# Room for a JPEG: a tenth of the decoded picture (a 1080p frame at the mesh's quality 80 is about 180 kB of 6.2
# MB, at quality 95 about 400 kB); a larger one is not handed over, only fetched.
JPEG_SHARE = 10
JPEG_MIN_BYTES = 64 * 1024
# Detect, which puts the JPEGs, runs further ahead of pose than pose of annotate: decoding is bounded only ahead of
# annotate, by MAX_FRAMES_AHEAD (64 by default), looked at every PACED_EVERY frames, so the newest frame decoded is
# at most MAX_FRAMES_AHEAD + PACED_EVERY - 1 past annotate's count. With one slot count for both parts, pose found 137
# of 302 JPEGs (bench/README.md). So a ring has a JPEG slot for each of those frames, and PACED_EVERY more: in steady
# running detect never writes over a JPEG pose or annotate will still take. What can still lap it (a miss, served
# from the broker, never a wrong frame): an ingest replica taking a task over (it counts from where the stream
# stopped), decoding that stopped waiting for a stuck count (STUCK_S), a stage replaying from its committed offsets,
# a live camera (bounded by its lag, not by MAX_FRAMES_AHEAD), a decoder configured further ahead than annotate.
# The JPEG slots come first out of the budget (a tenth of a picture slot each: 80 of 1080p take 48 of the default
# 320 MB), and the picture slots get the rest.
JPEG_SLOTS_BEYOND_AHEAD = 2 * PACED_EVERY
# More picture slots would seldom be used (pose runs at most MAX_FRAMES_AHEAD frames ahead of annotate); the
# budget (POSEMESH_SHARED_PICTURES_MB) usually allows fewer (45 of 1080p in 320 MB): a pose further ahead than
# that makes annotate fetch and decode the frames it lapped.
MAX_SLOTS = 128
MIN_PICTURE_SLOTS = 2  # fewer would not be worth a ring
LOOK_AGAIN_S = 1.0  # detect and pose check that a ring they use is still read at most this often
LOOK_FOR_RING_S = 0.2  # and looks for a task's ring, while it has none, at most this often (a glob)
LOCK_TRIES = 20  # a slot is locked for a copy (about a millisecond): one locked for 20 tries is a miss
LOCK_PAUSE_S = 0.0005


@dataclass(frozen=True)
class PictureKey:
    """The frame a slot holds: the same index can come again from another run (epoch) or another offset (a
    re-decoded upload after the broker lost its data)."""

    epoch: int
    index: int
    partition: int
    offset: int


EMPTY = PictureKey(-1, -1, -1, -1)


def _pages(n: int) -> int:
    return n + -n % mmap.PAGESIZE


def _jpeg_room(picture_bytes: int) -> int:
    return max(JPEG_MIN_BYTES, picture_bytes // JPEG_SHARE)


def slot_parts(width: int, height: int) -> tuple[int, int]:
    """The bytes of a picture slot and of a JPEG slot, for frames of up to width x height (whole pages)."""
    picture = width * height * 3
    return _pages(SLOT_HEADER.size + picture), _pages(SLOT_HEADER.size + _jpeg_room(picture))


def ring_slots(width: int, height: int, frames: int, budget_bytes: int, frames_ahead: int) -> tuple[int, int]:
    """A ring's picture and JPEG slots for frames of up to width x height in `budget_bytes`, for a video of `frames`
    frames (0: not known) decoded at most `frames_ahead` frames ahead of annotate (0: not bounded, and then MAX_SLOTS
    JPEG slots, a guess); (0, 0): no ring."""
    picture_part, jpeg_part = slot_parts(width, height)
    room = budget_bytes - HEADER_BYTES
    jpegs = max(0, frames_ahead) + JPEG_SLOTS_BEYOND_AHEAD if frames_ahead else MAX_SLOTS
    jpegs = min(jpegs, frames or jpegs, max(0, room - MIN_PICTURE_SLOTS * picture_part) // jpeg_part)
    pictures = min(MAX_SLOTS, frames or MAX_SLOTS, (room - jpegs * jpeg_part) // picture_part)
    return (pictures, jpegs) if pictures >= MIN_PICTURE_SLOTS and jpegs > 0 else (0, 0)


def remove_if_ownerless(fd: int, path: Path) -> bool:
    """Whether the ring open as `fd` has no live owner (its first page's lock can be taken); if so, and `path` is
    still that ring (not replaced by a live one meanwhile), the file is removed."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, HEADER_BYTES, 0)
    except OSError:
        return False  # locked: its owner is alive
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, HEADER_BYTES, 0)
    return True


class Ring:
    """One task's slots, mapped into this process. The picture slots' count is in the file's name
    (`<task>.<slots>`), the rest of the layout on its first page."""

    def __init__(self, path: Path, fd: int, slots: int):
        self.path, self.fd, self.slots = path, fd, slots
        stat = os.fstat(fd)
        size, self.inode = stat.st_size, stat.st_ino
        if size < HEADER_BYTES:
            raise ValueError(f"{path.name} is not laid out as a ring")
        self.map = mmap.mmap(fd, size)
        mark, self.picture_part, self.jpeg_slots, self.jpeg_part, self.jpeg_room = LAYOUT.unpack_from(self.map, 0)
        self.slot_bytes = self.picture_part - SLOT_HEADER.size  # a picture's room
        self.jpegs_at = HEADER_BYTES + slots * self.picture_part
        if (mark != LAYOUT_MARK or slots <= 0 or self.slot_bytes <= 0 or self.jpeg_slots <= 0
                or not 0 <= self.jpeg_room <= self.jpeg_part - SLOT_HEADER.size
                or self.jpegs_at + self.jpeg_slots * self.jpeg_part != size):
            self.map.close()
            raise ValueError(f"{path.name} is not laid out as a ring")
        self.checked = time.monotonic()
        self.owned = False  # made by this process (which holds the lock on its first page)
        self.taken = self.missed = 0  # the owner's takes

    @classmethod
    def create(cls, path: Path, width: int, height: int, slots: int, jpeg_slots: int) -> Ring | None:
        """A new ring at `path` (replacing any), its memory reserved now (a full shared memory folder gives
        None here rather than SIGBUS at the first write), locked as this process's until it closes it."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")  # pids repeat across containers
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.info("no shared pictures for %s: %s", path.name, exc)
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, HEADER_BYTES, 0)
            picture_part, jpeg_part = slot_parts(width, height)
            os.posix_fallocate(fd, 0, HEADER_BYTES + slots * picture_part + jpeg_slots * jpeg_part)
            os.pwrite(fd, LAYOUT.pack(LAYOUT_MARK, picture_part, jpeg_slots, jpeg_part,
                                      _jpeg_room(width * height * 3)), 0)
            ring = cls(path, fd, slots)
            ring.owned = True
            for slot in range(slots):
                ring._write_header(ring._picture_at(slot), EMPTY, -1)
            for slot in range(jpeg_slots):
                ring._write_header(ring._jpeg_at(slot), EMPTY, -1)
            os.rename(tmp, path)
            return ring
        except OSError as exc:
            log.info("no shared pictures for %s: %s", path.name, exc)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None

    @classmethod
    def open(cls, path: Path) -> Ring | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            return cls(path, fd, int(path.name.rsplit(".", 1)[1]))
        except (OSError, ValueError, IndexError, struct.error):
            os.close(fd)
            return None

    def orphaned(self) -> bool:
        """The file is gone or was replaced (the task moved on), or its owner died: nobody reads it. A dead
        owner's file is removed here."""
        return not self.current() or remove_if_ownerless(self.fd, self.path)

    def current(self) -> bool:
        """The file at the ring's path is still this ring's."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)  # drops this process's locks on the file (the owner's included)
        self.fd = -1  # a picture found before cannot lock whatever file reuses the number (EBADF instead)

    def _picture_at(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.picture_part

    def _jpeg_at(self, slot: int) -> int:
        return self.jpegs_at + slot * self.jpeg_part

    def _write_header(self, at: int, key: PictureKey, nbytes: int) -> None:
        SLOT_HEADER.pack_into(self.map, at, key.epoch, key.index, key.partition, key.offset, nbytes)

    @contextlib.contextmanager
    def _locked(self, at: int, length: int, exclusive: bool):
        """Hold the lock of the slot at `at`; OSError when it stays taken (a copy stopped half way: SIGSTOP, a
        paused container) or the ring is closed."""
        kind = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        for tries_left in range(LOCK_TRIES - 1, -1, -1):
            try:
                fcntl.lockf(self.fd, kind, length, at)
                break
            except (BlockingIOError, PermissionError):
                if not tries_left:
                    raise
                time.sleep(LOCK_PAUSE_S)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, length, at)

    def put(self, key: PictureKey, image: np.ndarray) -> bool:
        if image.nbytes > self.slot_bytes or not image.flags.c_contiguous:
            return False
        return self._write(self._picture_at(key.index % self.slots), self.picture_part, key, image.reshape(-1))

    def _write(self, at: int, length: int, key: PictureKey, data) -> bool:
        """Copy `data` (bytes-like) into the slot at `at`, named as the frame's once it is all there."""
        try:
            with self._locked(at, length, exclusive=True):
                self._write_header(at, EMPTY, -1)  # a copy cut short names no frame
                self.map[at + SLOT_HEADER.size:at + SLOT_HEADER.size + len(data)] = data
                self._write_header(at, key, len(data))
        except (OSError, ValueError):  # locked too long, or closed
            return False
        return True

    def holds(self, key: PictureKey, nbytes: int) -> bool:
        at = self._picture_at(key.index % self.slots)
        try:
            with self._locked(at, self.picture_part, exclusive=False):
                return self._holds(at, key, nbytes)
        except (OSError, ValueError):
            return False

    def _holds(self, at: int, key: PictureKey, nbytes: int) -> bool:
        held = SLOT_HEADER.unpack_from(self.map, at)
        return held == (key.epoch, key.index, key.partition, key.offset, nbytes)

    def take(self, key: PictureKey, out: np.ndarray) -> bool:
        """Copy the frame into `out` (its shape says the frame's); False when the slot no longer holds it."""
        at = self._picture_at(key.index % self.slots)
        with self._locked(at, self.picture_part, exclusive=False):
            if not self._holds(at, key, out.nbytes):
                return False
            out.reshape(-1)[:] = np.frombuffer(self.map, np.uint8, out.nbytes, at + SLOT_HEADER.size)
            return True

    def put_jpeg(self, key: PictureKey, data: bytes) -> bool:
        return len(data) <= self.jpeg_room and self._write(self._jpeg_at(key.index % self.jpeg_slots),
                                                           self.jpeg_part, key, data)

    def jpeg(self, key: PictureKey) -> bytes | None:
        """The frame's JPEG, if the slot holds it."""
        at = self._jpeg_at(key.index % self.jpeg_slots)
        try:
            with self._locked(at, self.jpeg_part, exclusive=False):
                *held, nbytes = SLOT_HEADER.unpack_from(self.map, at)
                if (tuple(held) != (key.epoch, key.index, key.partition, key.offset)
                        or not 0 <= nbytes <= self.jpeg_room):
                    return None
                return self.map[at + SLOT_HEADER.size:at + SLOT_HEADER.size + nbytes]
        except (OSError, ValueError):
            return None


@dataclass
class SharedPicture:
    """A frame found in its task's ring, to be copied out when it is drawn on (one buffer at a time, not a
    batch of them): by then a pose far enough ahead may have written over its slot, and take() says so."""

    ring: Ring
    key: PictureKey
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3

    def take(self, buffer: np.ndarray) -> np.ndarray | None:
        """The picture, in `buffer` (flat, at least nbytes), or None if it is gone."""
        out = buffer[:self.nbytes].reshape(self.height, self.width, 3)
        try:
            taken = self.ring.take(self.key, out)
        except (ValueError, OSError):  # the ring was closed meanwhile (the task moved on)
            taken = False
        self.ring.taken += taken
        self.ring.missed += not taken
        PICTURES.labels("taken" if taken else "missed").inc()
        return out if taken else None


class SharedPictures:
    """One worker's rings: those it owns (annotate: `owner`, which reads only its own) or those it finds and uses
    (detect, pose)."""

    def __init__(self, folder: Path, budget_bytes: int, *, frames_ahead: int, owner: bool = False):
        self.folder, self.budget_bytes, self.owner = folder, budget_bytes, owner
        self.frames_ahead = frames_ahead  # how far decoding may run ahead of annotate (MAX_FRAMES_AHEAD)
        self.rings: dict[str, Ring] = {}
        self.looked: dict[str, float] = {}  # detect, pose: when it last looked for a task's ring
        self.put_count = 0  # pictures this process put into rings
        self.taken_before = 0  # pictures taken out of rings this process has removed
        self.jpegs_put = self.jpegs_taken = 0

    # ------------------------------------------------------------------ annotate's side

    def make(self, task_id: str, width: int, height: int, frames: int = 0) -> None:
        """Make the task's ring, for frames of up to width x height: as many slots as the budget holds, and no
        more than the video's frames (0: not known)."""
        ring = self.rings.get(task_id)
        if ring is not None and ring.current():
            return
        if ring is not None:  # removed meanwhile (by a replica that took the task over, then gave it back)
            self.remove(task_id)
        if width <= 0 or height <= 0:
            return
        slots, jpeg_slots = ring_slots(width, height, frames, self.budget_bytes, self.frames_ahead)
        if not slots:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.info("no shared pictures: %s", exc)
            return
        with contextlib.suppress(OSError):
            for old in self.folder.glob(f"{task_id}.*"):  # a predecessor's on this host, maybe of another size
                old.unlink()
        ring = Ring.create(self.folder / f"{task_id}.{slots}", width, height, slots, jpeg_slots)
        if ring is not None:
            self.rings[task_id] = ring

    def find(self, task_id: str, key: PictureKey, width: int, height: int) -> SharedPicture | None:
        """The frame, if its task's ring holds it now."""
        ring = self.rings.get(task_id)
        if ring is not None and ring.holds(key, width * height * 3):
            return SharedPicture(ring, key, width, height)
        if ring is not None:
            ring.missed += 1
        PICTURES.labels("missed").inc()
        return None

    @property
    def taken_count(self) -> int:
        """Pictures taken out of this worker's rings (those still open, and those removed)."""
        return self.taken_before + sum(ring.taken for ring in list(self.rings.values()))  # read by GetStatus

    def remove(self, task_id: str) -> None:
        """The task ended or moved: its ring goes (if it is still the one this replica made)."""
        ring = self.rings.pop(task_id, None)
        if ring is None:
            return
        log.info("shared pictures of %s: %d frames taken, %d fetched and decoded", task_id, ring.taken, ring.missed)
        self.taken_before += ring.taken
        if ring.owned and ring.current():
            with contextlib.suppress(OSError):
                os.unlink(ring.path)
        ring.close()

    def sweep(self) -> None:
        """Remove the rings of replicas that are gone (a SIGKILL leaves its rings behind)."""
        mine = {ring.path for ring in self.rings.values()}  # closing a file of ours would drop our lock on it
        try:
            paths = [p for p in self.folder.iterdir() if p not in mine]
        except OSError:  # no folder (yet), or not ours to read
            return
        for path in paths:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                remove_if_ownerless(fd, path)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ detect's and pose's side

    def put(self, task_id: str, key: PictureKey, image: np.ndarray) -> None:
        """Copy a decoded frame into the task's ring, if a replica on this host made one."""
        ring = self._ring_found(task_id)
        if ring is not None and ring.put(key, image):
            self.put_count += 1
            PICTURES.labels("put").inc()

    def put_jpeg(self, task_id: str, key: PictureKey, data: bytes) -> None:
        """Copy a frame's JPEG, as read from its raw_frames record, into the task's ring (detect)."""
        ring = self._ring_found(task_id)
        if ring is not None and ring.put_jpeg(key, data):
            self.jpegs_put += 1
            JPEGS.labels("put").inc()

    def jpeg(self, task_id: str, key: PictureKey) -> bytes | None:
        """The frame's JPEG, if detect left it in the task's ring on this host (pose, annotate)."""
        # An owner's ring is never an orphan to it (its lock is its own process's), and it uses no other.
        ring = self.rings.get(task_id) if self.owner else self._ring_found(task_id)
        data = ring.jpeg(key) if ring is not None else None
        self.jpegs_taken += data is not None
        JPEGS.labels("missed" if data is None else "taken").inc()
        return data

    def _ring_found(self, task_id: str) -> Ring | None:
        now = time.monotonic()
        ring = self.rings.get(task_id)
        if ring is not None and now - ring.checked > LOOK_AGAIN_S:
            ring.checked = now
            if ring.orphaned():  # looked for again a second later: a new owner may have made one
                self.rings.pop(task_id).close()
                self.looked[task_id], ring = now + LOOK_AGAIN_S - LOOK_FOR_RING_S, None
        if ring is None and now - self.looked.get(task_id, -LOOK_FOR_RING_S) >= LOOK_FOR_RING_S:
            self.looked[task_id] = now
            path = next(iter(self.folder.glob(f"{task_id}.*")), None)
            ring = Ring.open(path) if path is not None else None
            if ring is not None and ring.orphaned():  # a dead owner's, not swept yet
                ring.close()
                ring = None
            if ring is not None:
                self.rings[task_id] = ring
        return ring

    def forget(self, task_id: str) -> None:
        """Let go of a task's ring without removing it (pose: the task ended or moved, or nobody reads it)."""
        ring = self.rings.pop(task_id, None)
        self.looked.pop(task_id, None)
        if ring is not None:
            ring.close()

    def close(self) -> None:
        """Shutting down (or starting over): the rings this worker owns are removed, the others let go of."""
        for task_id, ring in list(self.rings.items()):
            if ring.owned:
                self.remove(task_id)
            else:
                self.forget(task_id)
