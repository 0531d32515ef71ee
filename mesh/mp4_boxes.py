"""A strict look at an ISO-BMFF file's boxes (MP4, MOV, M4V, 3GP) before FFmpeg opens it.

FFmpeg's mov demuxer believes the counts a file declares: it builds an index entry for every sample the
sample tables declare (about 70 bytes each, with timing), repeats the index for every entry of an edit list,
and allocates some tables (sample group descriptions, image items) at their declared size, zeroed. A file
of 2 KB declaring 10 million samples took a process from 61 MB to 755 MB before it was refused; one
declaring 2 billion sync sample groups, to 1.97 GB. So before FFmpeg sees the file, `check` walks the boxes
FFmpeg reads (moov/trak/mdia/minf/stbl, edit lists, movie fragments, the fragment random access index,
segment indexes, image items) and refuses a file whose counts are impossible for the bytes it has:

- a table declaring more entries than its box holds (stts, ctts, stsc, stsz/stz2, stco/co64, stss, ...),
- more samples (times their edit lists) than the file has bytes: every sample takes at least one byte,
- samples of a constant size that add up to more than the file,
- a timing table (stts) declaring far more samples than the size table (stsz) holds.

So what FFmpeg can be made to allocate for the index grows with the upload's real size, not with what it
says. The walk itself reads box headers and streams the tables in blocks: its memory does not grow with
the file. Boxes are clamped to their parent (and the file) the way FFmpeg clamps them, so the walk sees
what FFmpeg would; a table cut short by that is refused. Messages are for the uploader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

# Boxes whose payload is a list of boxes, as FFmpeg walks them. `meta` is a full box (4 bytes first)
# except QuickTime's, which starts with its hdlr box at once.
CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"mvex", b"udta", b"meta",
              b"moof", b"traf", b"mfra", b"iprp"}
MAX_DEPTH = 12  # moov/udta/meta/iprp/... is 5 deep; anything deeper is not a video file's index
MAX_BOXES = 1_000_000  # a fragmented hour at one fragment per frame is ~220,000
BLOCK = 1 << 16  # tables are streamed in blocks of this many bytes
# A sample FFmpeg indexes takes at least this many bytes of the file. One byte is what no real file goes
# under (silent AAC frames are ~6 bytes, skipped H.264 frames ~10): with it, the index FFmpeg builds is at
# most ~70 bytes of memory per byte of upload, and the 10-million-sample files are refused whole.
MIN_SAMPLE_BYTES = 1
# The stts of a real file counts the samples stsz has, give or take a muxer's slip; this many times more,
# plus a few, is no slip.
TIMING_SLACK = 2
TIMING_SLACK_SAMPLES = 16


class Damaged(ValueError):
    """The file's index is impossible for its bytes; the message says so, for the uploader."""


@dataclass
class Track:
    number: int  # 1-based, in the order of the file
    handler: bytes = b""  # b"vide", b"soun", ...
    samples: int = 0  # stsz/stz2's count
    sample_size: int = 0  # stsz's constant size, 0 when each sample has its own
    timed: int = 0  # samples stts declares
    timing_runs: int = 0
    first_delta: int = 0
    chunks: int = 0  # stco/co64's count
    most_per_chunk: int = 0  # the largest samples-per-chunk of stsc
    edits: int = 0  # edit list entries that map media (an empty edit, time -1, maps none)

    @property
    def chunk_based(self) -> bool:
        """FFmpeg indexes old uncompressed audio by chunk, not by sample, when stts says so (one run of
        delta 1); a chunk becomes one entry per 160 samples or more."""
        return self.handler == b"soun" and self.timing_runs == 1 and self.first_delta == 1

    @property
    def entries(self) -> int:
        """The most index entries FFmpeg builds for the track, before edit lists repeat them."""
        if self.chunk_based:
            return self.chunks * -(-self.most_per_chunk // 160)
        return self.samples


@dataclass
class Index:
    """What the walk found: the tracks of moov, and the samples movie fragments declare."""
    size: int
    tracks: list[Track] = field(default_factory=list)
    fragment_samples: int = 0

    def video_samples(self) -> int:
        return max((t.samples for t in self.tracks if t.handler == b"vide"), default=0)


def check(file: BinaryIO, size: int) -> Index:
    """Walk the file's boxes and refuse (Damaged) an index impossible for `size` bytes. The file is left
    positioned anywhere: seek before using it."""
    walk = _Walk(file, size)
    walk.boxes(0, size, 0, b"")
    index = walk.index
    total = index.fragment_samples
    for track in index.tracks:
        total += _check_track(track, size)
    if total > size // MIN_SAMPLE_BYTES:
        raise Damaged(f"the MP4's index declares {total} samples but the file has only {size} bytes, and a "
                      "sample takes at least one: the file is damaged or was made to look bigger than it is; "
                      "export it again")
    return index


def _check_track(track: Track, size: int) -> int:
    """Refuse what is impossible for one track; return the index entries FFmpeg may build for it."""
    name = f"track {track.number} of the MP4"
    if track.timed > TIMING_SLACK * track.samples + TIMING_SLACK_SAMPLES:
        raise Damaged(f"{name} times {track.timed} samples (stts) but has sizes for {track.samples} (stsz): "
                      "the file is damaged; export it again")
    if track.sample_size and not track.chunk_based and track.samples * track.sample_size > size:
        unit = "byte" if track.sample_size == 1 else "bytes"
        raise Damaged(f"{name} declares {track.samples} samples of {track.sample_size} {unit} each "
                      f"({track.samples * track.sample_size} bytes) but the file has only {size} bytes: the file "
                      "is damaged or was made to look bigger than it is; export it again")
    entries = track.entries * max(1, track.edits)
    if entries > size // MIN_SAMPLE_BYTES:
        repeated = f", repeated by {track.edits} edit list entries," if track.edits > 1 else ""
        raise Damaged(f"{name} declares {track.entries} samples{repeated} but the file has only {size} bytes, "
                      "and a sample takes at least one: the file is damaged or was made to look bigger than it "
                      "is; export it again")
    return entries


def _damaged_table(kind: bytes, where: str, count: int, room: int) -> Damaged:
    return Damaged(f"the MP4's '{kind.decode('latin-1')}' table{where} declares {count} entries but holds "
                   f"{max(room, 0)}: the file is damaged or cut short inside its index; export it again")


class _Walk:
    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size = file, size
        self.index = Index(size)
        self.visited = 0

    def read(self, offset: int, n: int) -> bytes:
        self.file.seek(offset)
        data = self.file.read(n)
        if len(data) != n:  # the file changed under us, or the caller's size was wrong
            raise Damaged("the MP4 ends inside its index: upload the whole file")
        return data

    def boxes(self, start: int, end: int, depth: int, parent: bytes) -> None:
        """The boxes in [start, end), as FFmpeg's mov_read_default reads them: a size of 0 runs to the end
        of the parent, 1 means a 64-bit size follows, a size under the header ends the parent, and a box
        running past its parent is clamped to it."""
        if depth > MAX_DEPTH:
            raise Damaged(f"the MP4's boxes are nested more than {MAX_DEPTH} deep: it is not a video file "
                          "posemesh accepts")
        pos = start
        while end - pos >= 8:
            self.visited += 1
            if self.visited > MAX_BOXES:
                raise Damaged(f"the MP4 has more than {MAX_BOXES} boxes: it is not a video file posemesh accepts")
            size, kind = struct.unpack(">I4s", self.read(pos, 8))
            header = 8
            if size == 1:
                if end - pos < 16:
                    return
                size, header = struct.unpack(">Q", self.read(pos + 8, 8))[0], 16
            elif size == 0:
                size = end - pos
            if size < header:
                return  # FFmpeg stops reading the parent here
            box_end = min(pos + size, end)
            self.box(kind, pos + header, box_end, depth, parent)
            pos += size

    def box(self, kind: bytes, start: int, end: int, depth: int, parent: bytes) -> None:
        # FFmpeg dispatches on the box's type wherever it stands, and a table belongs to the last track
        # begun (not only to the one it sits in): so does the walk.
        last = self.index.tracks[-1] if self.index.tracks else None
        if kind == b"trak":
            self.index.tracks.append(Track(len(self.index.tracks) + 1))
            self.boxes(start, end, depth + 1, kind)
        elif kind == b"meta":
            # A full box, except QuickTime's whose first child (hdlr) starts at once.
            skip = 0 if end - start >= 8 and self.read(start + 4, 4) == b"hdlr" else 4
            self.boxes(start + skip, end, depth + 1, kind)
        elif kind in CONTAINERS:
            self.boxes(start, end, depth + 1, kind)
        elif kind in _SAMPLE_TABLES:
            if last is not None:  # before any track FFmpeg ignores them
                self.sample_table(last, kind, start, end)
        elif kind == b"hdlr" and parent == b"mdia" and last is not None and end - start >= 12:
            last.handler = self.read(start + 8, 4)
        elif kind == b"trun":
            self.track_run(start, end)
        elif kind in _OTHER_TABLES:
            self.other_table(kind, start, end)

    # ------------------------------------------------------------------ tables

    def _head(self, kind: bytes, start: int, end: int, n: int) -> bytes:
        """The first n bytes of a table box (version and flags included), or Damaged when it is shorter."""
        if end - start < n:
            raise Damaged(f"the MP4's '{kind.decode('latin-1')}' box is cut short: the file is damaged; "
                          "export it again")
        return self.read(start, n)

    @staticmethod
    def _fits(kind: bytes, count: int, entry: int, room: int, track: Track | None = None) -> None:
        if count * entry > room:
            where = f" of track {track.number}" if track is not None else ""
            raise _damaged_table(kind, where, count, room // entry if entry else 0)

    def _columns(self, start: int, count: int, width: int):
        """The rows of a table of `width` big-endian 32-bit columns, a block at a time (numpy arrays)."""
        per_block = max(1, BLOCK // (4 * width))
        for first in range(0, count, per_block):
            rows = min(per_block, count - first)
            data = self.read(start + first * 4 * width, rows * 4 * width)
            yield np.frombuffer(data, dtype=">u4").reshape(rows, width)

    def sample_table(self, track: Track, kind: bytes, start: int, end: int) -> None:
        if kind == b"stsz":
            _, sample_size, count = struct.unpack(">III", self._head(kind, start, end, 12))
            track.samples, track.sample_size = count, sample_size
            if not sample_size:
                self._fits(kind, count, 4, end - start - 12, track)
        elif kind == b"stz2":
            _, field_bits, count = struct.unpack(">III", self._head(kind, start, end, 12))
            field_bits &= 0xFF
            if field_bits not in (4, 8, 16):
                raise Damaged(f"the MP4's 'stz2' table of track {track.number} has {field_bits}-bit sizes (4, 8 or "
                              "16 are defined): the file is damaged; export it again")
            track.samples, track.sample_size = count, 0
            if (count * field_bits + 7) // 8 > end - start - 12:
                raise _damaged_table(kind, f" of track {track.number}", count, (end - start - 12) * 8 // field_bits)
        elif kind == b"elst":
            self.edit_list(track, start, end)
        else:  # version and flags, a count, then entries of `width` 32-bit fields
            count = struct.unpack(">I", self._head(kind, start, end, 8)[4:8])[0]
            width = {b"stts": 2, b"ctts": 2, b"stsc": 3, b"co64": 2}.get(kind, 1)
            self._fits(kind, count, 4 * width, end - start - 8, track)
            if kind == b"stts":
                track.timing_runs, track.timed, track.first_delta = count, 0, 0
                for block, rows in enumerate(self._columns(start + 8, count, 2)):
                    if block == 0:
                        track.first_delta = int(rows[0, 1])
                    track.timed += int(rows[:, 0].sum(dtype=np.uint64))
            elif kind == b"stsc":
                track.most_per_chunk = 0
                for rows in self._columns(start + 8, count, 3):
                    track.most_per_chunk = max(track.most_per_chunk, int(rows[:, 1].max()))
            elif kind in (b"stco", b"co64"):
                track.chunks = count

    def edit_list(self, track: Track, start: int, end: int) -> None:
        version_flags, count = struct.unpack(">II", self._head(b"elst", start, end, 8))
        wide = version_flags >> 24 == 1
        entry = 20 if wide else 12
        self._fits(b"elst", count, entry, end - start - 8, track)
        layout = [("d", ">u8"), ("t", ">i8"), ("r", ">u4")] if wide else [("d", ">u4"), ("t", ">i4"), ("r", ">u4")]
        edits, per_block = 0, BLOCK // entry
        for first in range(0, count, per_block):
            rows = min(per_block, count - first)
            times = np.frombuffer(self.read(start + 8 + first * entry, rows * entry), dtype=np.dtype(layout))["t"]
            edits += int((times != -1).sum())
        track.edits = edits

    def track_run(self, start: int, end: int) -> None:
        """A movie fragment's run: its samples count like moov's, and its per-sample fields must fit."""
        flags, count = struct.unpack(">II", self._head(b"trun", start, end, 8))
        head = 8 + 4 * bool(flags & 0x1) + 4 * bool(flags & 0x4)
        per_sample = 4 * sum(bool(flags & bit) for bit in (0x100, 0x200, 0x400, 0x800))
        if end - start < head:
            raise Damaged("the MP4's 'trun' box is cut short: the file is damaged; export it again")
        self._fits(b"trun", count, per_sample, end - start - head)
        self.index.fragment_samples += count

    def other_table(self, kind: bytes, start: int, end: int) -> None:
        """Tables FFmpeg sizes from their declared count: the count must fit the box."""
        version = self._head(kind, start, end, 4)[0]
        if kind == b"sbgp":  # grouping_type, [parameter], count; entries of 8 bytes
            at = 8 + 4 * (version == 1)
            count = struct.unpack(">I", self._head(kind, start, end, at + 4)[at:])[0]
            self._fits(kind, count, 8, end - start - at - 4)
        elif kind == b"sgpd":  # grouping_type, [default_length], [default index], count; entries of at least
            at = 8 + 4 * (version >= 1) + 4 * (version >= 2)  # the default length, 4 (a length each) or 1
            head = self._head(kind, start, end, at + 4)
            default_length = struct.unpack(">I", head[8:12])[0] if version >= 1 else 0
            count = struct.unpack(">I", head[at:at + 4])[0]
            self._fits(kind, count, default_length or (4 if version >= 1 else 1), end - start - at - 4)
        elif kind == b"tfra":  # track_ID, length sizes, count; entries of 8 or 16 bytes plus three numbers
            head = self._head(kind, start, end, 16)
            sizes, count = struct.unpack(">II", head[8:16])
            entry = (16 if version == 1 else 8) + ((sizes >> 4) & 3) + ((sizes >> 2) & 3) + (sizes & 3) + 3
            self._fits(kind, count, entry, end - start - 16)
        elif kind == b"sidx":  # reference_ID, timescale, times (4+4 or 8+8), reserved, 16-bit count; 12 bytes each
            at = 12 + (16 if version == 1 else 8)
            count = struct.unpack(">H", self._head(kind, start, end, at + 4)[at + 2:at + 4])[0]
            self._fits(kind, count, 12, end - start - at - 4)
        elif kind == b"iinf":  # 16-bit count (version 0) or 32-bit; each item an infe box of 12 bytes or more
            width = 2 if version == 0 else 4
            head = self._head(kind, start, end, 4 + width)
            count = int.from_bytes(head[4:4 + width], "big")
            self._fits(kind, count, 12, end - start - 4 - width)
        elif kind == b"iloc":  # sizes (2 bytes), 16-bit count (versions 0, 1) or 32-bit; items of 4 bytes or more
            width = 2 if version < 2 else 4
            head = self._head(kind, start, end, 6 + width)
            count = int.from_bytes(head[6:6 + width], "big")
            self._fits(kind, count, 4, end - start - 6 - width)
        elif kind == b"ipma":  # 32-bit count; entries of an item id (2 or 4 bytes) and a 1-byte count or more
            count = struct.unpack(">I", self._head(kind, start, end, 8)[4:8])[0]
            self._fits(kind, count, 3, end - start - 8)


_SAMPLE_TABLES = {b"stts", b"ctts", b"stsc", b"stsz", b"stz2", b"stco", b"co64", b"stss", b"stps", b"elst"}
_OTHER_TABLES = {b"sbgp", b"sgpd", b"tfra", b"sidx", b"iinf", b"iloc", b"ipma"}
