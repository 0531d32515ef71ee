"""Hostile MP4s made from a real one: the mmpose demo clip's boxes, parsed, with its sample tables rewritten
to declare far more samples than the file holds (FFmpeg's mov demuxer builds an index entry for every
declared sample, so a 2 KB file could cost the gateway hundreds of MB before it is refused).

This is a deliberately small writer of its own (the parser under test, posemesh.mesh.mp4_boxes, is not
used to make the files it is tested on)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from posemesh.mesh.settings import default_media_dir

SOURCE = default_media_dir() / "mmpose_demo_960x540_5f.mp4"
CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"mvex", b"moof", b"traf"}
TEN_MILLION = 10_000_000


@dataclass
class Box:
    type: bytes
    payload: bytes = b""
    children: list[Box] = field(default_factory=list)
    large: bool = False  # written with a 64-bit size

    def child(self, *path: bytes) -> Box:
        box = self
        for kind in path:
            box = next(b for b in box.children if b.type == kind)
        return box

    def body(self) -> bytes:
        return b"".join(c.serialize() for c in self.children) if self.type in CONTAINERS else self.payload

    def serialize(self) -> bytes:
        body = self.body()
        if self.large:
            return struct.pack(">I4sQ", 1, self.type, 16 + len(body)) + body
        return struct.pack(">I4s", 8 + len(body), self.type) + body


def parse(data: bytes) -> list[Box]:
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = len(data) - pos
        body = data[pos + header:pos + size]
        boxes.append(Box(kind, children=parse(body)) if kind in CONTAINERS else Box(kind, body))
        pos += size
    return boxes


def full_box(version_flags: int, *fields: int, fmt: str = "I") -> bytes:
    """A full box's payload: version and flags, then 32-bit (or `fmt`) fields."""
    return struct.pack(">I", version_flags) + b"".join(struct.pack(">" + fmt, f) for f in fields)


def table(box: Box) -> tuple[int, list[tuple[int, ...]]]:
    """(entry count, entries) of a table box of 32-bit fields (stts, ctts, stsc, stco, stss)."""
    width = {b"stts": 2, b"ctts": 2, b"stsc": 3, b"stco": 1, b"stss": 1}[box.type]
    count = struct.unpack(">I", box.payload[4:8])[0]
    present = min(count, (len(box.payload) - 8) // (4 * width))  # a forged count: what the box holds
    values = struct.unpack(f">{present * width}I", box.payload[8:8 + 4 * present * width])
    return count, [values[i:i + width] for i in range(0, len(values), width)]


def craft(kind: str, mdat_bytes: int | None = None, large: bool = False, count: int = TEN_MILLION,
          source: Path = SOURCE) -> bytes:
    """The source clip laid out as ftyp, moov, mdat (its chunk offsets moved to match), with `kind`'s change:

    - "ten-million": every table says `count` (10 million) samples, and each table is as long as it says:
      constant sample size 1, one stts run, one chunk of them all, one ctts run (what the issue sent);
    - "constant-size": the same with the first sample's real size (62,292 bytes) as the constant size;
    - "stsz-count": stsz keeps its 5 sizes but its count says `count` (the table claims more than its box);
    - "stts-count": stts's run says `count` samples of the 5 stsz holds;
    - "co64": "ten-million" with 64-bit chunk offsets (co64);
    - "stco-count": stco's entry count says `count` with one offset present;
    - "edits": 1,000 samples of a byte each, and an edit list of `count` entries each showing all of them
      (FFmpeg's index repeats the samples for every edit);
    - "sgpd": a sync sample group description declaring `count` entries with one present (FFmpeg allocates
      and zeroes a byte for each: 2 billion took a process to 1.97 GB);
    - "trun": a movie fragment whose run declares `count` samples with no per-sample fields;
    - "none": the clip as it is (a control: it must probe fine).
    `mdat_bytes` keeps only that many bytes of media data (the issue's file had 1,968 bytes in all); `large`
    writes the boxes on the way to the sample tables, the tables and mdat with 64-bit sizes."""
    boxes = parse(source.read_bytes())
    ftyp = next(b for b in boxes if b.type == b"ftyp")
    moov = next(b for b in boxes if b.type == b"moov")
    mdat = next(b for b in boxes if b.type == b"mdat")
    old_start = _media_start(source.read_bytes())
    stbl = moov.child(b"trak", b"mdia", b"minf", b"stbl")
    tables = {b.type: b for b in stbl.children}
    first_size = struct.unpack(">I", tables[b"stsz"].payload[12:16])[0]
    delta = table(tables[b"stts"])[1][0][1]
    if kind in ("ten-million", "co64", "constant-size"):
        tables[b"stsz"].payload = full_box(0, first_size if kind == "constant-size" else 1, count)
        tables[b"stts"].payload = full_box(0, 1, count, delta)
        tables[b"stsc"].payload = full_box(0, 1, 1, count, 1)
        tables[b"ctts"].payload = full_box(0, 1, count, delta)
        tables[b"stco"].payload = full_box(0, 1, table(tables[b"stco"])[1][0][0])
    elif kind == "stsz-count":
        payload = tables[b"stsz"].payload
        tables[b"stsz"].payload = payload[:8] + struct.pack(">I", count) + payload[12:]
    elif kind == "stts-count":
        tables[b"stts"].payload = full_box(0, 1, count, delta)
    elif kind == "stco-count":
        tables[b"stco"].payload = full_box(0, count, table(tables[b"stco"])[1][0][0])
    elif kind == "edits":
        samples = 1000
        tables[b"stsz"].payload = full_box(0, 1, samples)
        tables[b"stts"].payload = full_box(0, 1, samples, delta)
        tables[b"stsc"].payload = full_box(0, 1, 1, samples, 1)
        tables[b"ctts"].payload = full_box(0, 1, samples, delta)
        elst = moov.child(b"trak", b"edts", b"elst")
        elst.payload = full_box(0, count) + struct.pack(">IiI", samples * delta, 0, 1 << 16) * count
    elif kind == "sgpd":
        stbl.children.append(Box(b"sgpd", struct.pack(">I4sII", 1 << 24, b"sync", 1, count) + b"\x05"))
    elif kind == "trun":
        moov.children.append(Box(b"mvex", children=[Box(b"trex", full_box(0, 1, 1, 0, 0, 0))]))
    elif kind != "none":
        raise ValueError(kind)
    if kind == "co64":
        chunks = tables[b"stco"]
        chunks.type, chunks.payload = b"co64", full_box(0, 1) + struct.pack(">Q", table(chunks)[1][0][0])
    mdat = Box(b"mdat", mdat.payload[:mdat_bytes] if mdat_bytes is not None else mdat.payload)
    if large:
        for box in (moov, moov.child(b"trak"), moov.child(b"trak", b"mdia"), stbl, *stbl.children, mdat):
            box.large = True
    head = ftyp.serialize() + moov.serialize()
    new_start = len(head) + (16 if large else 8)
    _move_chunks(stbl, new_start - old_start)
    data = ftyp.serialize() + moov.serialize() + mdat.serialize()
    if kind == "trun":  # one fragment after the movie: default-base-is-moof, samples of 100 bytes by default
        run = Box(b"trun", full_box(0, count))
        header = Box(b"tfhd", full_box(0x20000 | 0x10, 1, 100))
        fragment = Box(b"traf", children=[header, run])
        data += Box(b"moof", children=[Box(b"mfhd", full_box(0, 1)), fragment]).serialize()
        data += Box(b"mdat", bytes(1000)).serialize()
    return data


def _media_start(data: bytes) -> int:
    """Where the source's mdat payload begins (its chunk offsets count from the file's start)."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"mdat":
            return pos + 8
        pos += size
    raise ValueError("no mdat")


def _move_chunks(stbl: Box, shift: int) -> None:
    for box in stbl.children:
        if box.type == b"stco":
            count, offsets = table(box)
            box.payload = full_box(0, count) + b"".join(struct.pack(">I", o + shift) for (o,) in offsets)
        elif box.type == b"co64":
            count = struct.unpack(">I", box.payload[4:8])[0]
            offsets = struct.unpack(f">{count}Q", box.payload[8:8 + 8 * count])
            box.payload = full_box(0, count) + b"".join(struct.pack(">Q", o + shift) for o in offsets)


def damaged_tail(dst: Path, nbytes: int, source: Path = SOURCE) -> Path:
    """The source with the last `nbytes` of its media data zeroed, its index intact: the packets are all
    there, the frames they held are not (the mmpose clip with 40,000 bytes zeroed: 5 packets, 2 frames)."""
    data = bytearray(source.read_bytes())
    start, pos = _media_start(bytes(data)), 0
    while pos + 8 <= len(data):  # the end of mdat
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"mdat":
            break
        pos += size
    end = pos + size
    assert end - nbytes >= start
    data[end - nbytes:end] = bytes(nbytes)
    dst.write_bytes(bytes(data))
    return dst
