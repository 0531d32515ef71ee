"""The upload probe (posemesh.mesh.media.probe) and the MP4 box check in front of it
(posemesh.mesh.mp4_boxes): memory bounded by what the file is, not by what it declares; real files of
every MP4 flavour still probe; VideoInfo's frame_count and duration_s as the proto documents them.

Hostile files are made from the real mmpose clip by tests/mp4_craft.py. The memory test runs each probe
in a fresh interpreter and reads its peak resident size (VmHWM), so nothing else in the test process
counts. Without the box check the same files took the probe from 61 MB to 755 MB (10 million samples),
1,969 MB (2 billion sample group entries) and 419 MB (a fragment of 10 million samples, accepted)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from posemesh.mesh import media, mp4_boxes
from posemesh.mesh.settings import REPO_ROOT
from tests import clips
from tests.conftest import media as media_file
from tests.mp4_craft import TEN_MILLION, Box, craft, parse

MIB = 1024  # VmHWM is in kB

# (kind, craft arguments, words the refusal must contain)
HOSTILE = [
    ("ten-million", {"mdat_bytes": 1000}, ["10000000 samples of 1 byte each", "1852 bytes"]),
    ("ten-million", {}, ["10000000 samples of 1 byte each"]),
    ("constant-size", {"mdat_bytes": 1000}, ["samples of 62292 bytes each"]),
    ("constant-size", {"count": 100_000}, ["100000 samples of 62292 bytes each"]),  # fewer samples than bytes
    ("stsz-count", {}, ["'stsz' table of track 1 declares 10000000 entries but holds 5"]),
    ("stts-count", {}, ["times 10000000 samples (stts)", "sizes for 5 (stsz)"]),
    ("co64", {"large": True}, ["10000000 samples of 1 byte each"]),
    ("stco-count", {}, ["'stco' table of track 1 declares 10000000 entries but holds 1"]),
    ("edits", {"count": 1000, "mdat_bytes": 1000}, ["1000 samples, repeated by 1000 edit list entries"]),
    ("sgpd", {"count": 2_000_000_000}, ["'sgpd' table declares 2000000000 entries but holds 1"]),
    ("trun", {}, ["declares 10000005 samples"]),
]

PROBE = """
import json, sys
from pathlib import Path
from posemesh.mesh import media

def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

before = peak_kb()
try:
    out = {"frames": media.probe(Path(sys.argv[1])).video.frame_count}
except media.NotAVideo as exc:
    out = {"refused": str(exc)}
print(json.dumps({**out, "before_kb": before, "peak_kb": peak_kb()}))
"""


def probe_in_child(path: Path) -> dict:
    """media.probe(path) in a fresh interpreter: its answer and its peak resident size."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    """A normal small file probed the same way: the 5-frame clip, moved through the same writer."""
    path = tmp_path_factory.mktemp("baseline") / "normal.mp4"
    path.write_bytes(craft("none"))
    result = probe_in_child(path)
    assert result.get("frames") == 5, result
    return result


@pytest.mark.parametrize(("kind", "kw", "words"), HOSTILE, ids=[f"{k}-{'-'.join(map(str, kw.values())) or 'full'}"
                                                               for k, kw, _ in HOSTILE])
def test_hostile_sample_tables_are_refused_within_a_few_mb(baseline, tmp_path, kind, kw, words):
    path = tmp_path / f"{kind}.mp4"
    path.write_bytes(craft(kind, **kw))
    result = probe_in_child(path)
    assert "refused" in result, f"{kind} was accepted: {result}"
    for word in words:
        assert word in result["refused"], result["refused"]
    assert "/" not in result["refused"] and len(result["refused"]) < 400
    # The refused probe costs no more than a normal probe (which decodes a 960x540 frame), give or take 4 MB.
    assert result["peak_kb"] - baseline["peak_kb"] < 4 * MIB, (result, baseline)


def test_the_smallest_hostile_file_is_as_small_as_the_issues():
    assert len(craft("ten-million", mdat_bytes=1000)) < 1968


@pytest.mark.parametrize(("name", "frames", "duration"), [
    ("mmpose_demo_960x540_5f.mp4", 5, 1.0), ("mmtracking_demo_1080p_8f.mp4", 8, 8 / 3),
    ("towncentre_1080p_302f.mp4", 302, 302 / 30), ("vtest_opencv_480x360.mp4", 795, 79.5)])
def test_real_clips_still_probe(name, frames, duration):
    info = media.probe(media_file(name))
    assert info.video.frame_count == frames and not info.warnings
    assert info.video.duration_s == pytest.approx(duration, abs=1e-5)


def test_duration_is_first_frame_to_the_end_of_the_last():
    """The proto's meaning: 5 frames at 5 fps last 1.0 s (0.8 s from the first frame's time to the last's,
    plus the last frame's interval), like the container's own duration."""
    path = media_file("mmpose_demo_960x540_5f.mp4")
    info = media.probe(path)
    assert (info.video.frame_count, info.video.fps, info.video.duration_s) == (5, 5.0, 1.0)
    with av.open(str(path)) as c:
        assert float(c.streams.video[0].duration * c.streams.video[0].time_base) == pytest.approx(1.0)
    reader = media.FrameReader(path, info.video.fps)
    assert [round(f.timestamp_s, 6) for f in reader] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert (reader.decoded, reader.duration_s()) == (5, pytest.approx(1.0))


def test_sampling_keeps_a_frame_each_time_the_clock_reaches_the_next_sample(tmp_path):
    """2.5 fps out of 10 fps: every 0.4 s from the first frame. A variable rate with a gap: the kept frames
    follow the video's clock, and the gap skips samples without shifting the later ones."""
    reader = media.FrameReader(clips.synth(tmp_path / "ten.mp4", 30, fps=10), 10.0, sample_fps=2.5)
    kept = [(f.index, round(f.timestamp_s, 6)) for f in reader]
    assert kept == [(i, round(0.4 * i, 6)) for i in range(8)]
    assert (reader.decoded, reader.read, reader.duration_s()) == (8, 30, pytest.approx(3.0))
    times = [0, 0.1, 0.2, 0.3, 1.25, 1.3, 1.5, 1.6, 2.0]
    reader = media.FrameReader(clips.synth(tmp_path / "gap.mp4", len(times), times=times), 10.0, sample_fps=2)
    assert [round(f.timestamp_s, 6) for f in reader] == [0.0, 1.25, 1.5, 2.0]


def test_variable_rate_duration_uses_the_average_interval(tmp_path):
    times = [0, 0.1, 0.15, 0.4, 0.5, 0.9]
    info = media.probe(clips.synth(tmp_path / "vfr.mp4", 6, times=times))
    assert info.video.duration_s == pytest.approx(0.9 + 0.9 / 5)
    assert info.video.fps == pytest.approx(5 / 0.9, abs=1e-5)


def _remux(src: Path, dst: Path, **options) -> Path:
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options=options) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return dst


def _pcm_mov(path: Path) -> Path:
    """H.264 with 16-bit PCM in a MOV: FFmpeg indexes such audio by chunk (one stts run of delta 1)."""
    images = clips.source_frames((320, 180))
    with av.open(str(path), "w", format="mov") as out:
        video = out.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt, video.options = 320, 180, "yuv420p", {"preset": "ultrafast"}
        audio = out.add_stream("pcm_s16le", rate=48000)
        for k in range(20):
            frame = av.VideoFrame.from_ndarray(images[k % 5], format="bgr24")
            frame.pts = k
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        for k in range(2 * 48000 // 1024):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, k * 1024
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return path


def test_every_mp4_flavour_still_probes(tmp_path):
    """Fragmented (one fragment per keyframe, and one per frame as CMAF low-latency does), faststart,
    MOV with PCM audio, 3GP, M4V, AAC audio, 64-bit box sizes, and a file cut after its index."""
    aac = clips.synth(tmp_path / "aac.mp4", 30, audio_s=3.0)
    large = tmp_path / "large.mp4"
    large.write_bytes(craft("none", large=True))
    cut = tmp_path / "cut.mp4"
    full = media_file("vtest_opencv_480x360.mp4").read_bytes()
    cut.write_bytes(full[: len(full) // 2])
    cases = {
        aac: 30,
        _remux(aac, tmp_path / "frag.mp4", movflags="frag_keyframe+empty_moov+default_base_moof"): 30,
        _remux(aac, tmp_path / "cmaf.mp4", movflags="frag_every_frame+empty_moov+default_base_moof"): 30,
        _remux(aac, tmp_path / "faststart.mp4", movflags="faststart"): 30,
        _pcm_mov(tmp_path / "pcm.mov"): 20,
        clips.synth(tmp_path / "a.3gp", 10, size=(176, 144), fmt="3gp"): 10,
        clips.synth(tmp_path / "a.m4v", 10, fmt="ipod"): 10,
        clips.synth(tmp_path / "rot.mov", 10, rotation=90, fmt="mov"): 10,
        large: 5,
        cut: 395,
    }
    for path, frames in cases.items():
        assert media.probe(path).video.frame_count == frames, path.name
    pcm = tmp_path / "pcm.mov"
    with open(pcm, "rb") as f:
        audio = mp4_boxes.check(f, pcm.stat().st_size).tracks[1]
    assert audio.chunk_based and audio.samples == 2 * 48000 // 1024 * 1024 and audio.entries < 1000
    with open(large, "rb") as f:
        assert f.read(8)[4:] == b"ftyp" and b"\x00\x00\x00\x01moov" in f.read(64)  # 64-bit sizes indeed


def test_a_file_cut_inside_its_index_is_refused_saying_so(tmp_path):
    full = media_file("vtest_opencv_480x360.mp4").read_bytes()  # moov first: 25 KB of index
    path = tmp_path / "cut.mp4"
    path.write_bytes(full[:5000])  # inside the video track's stsz
    with pytest.raises(media.NotAVideo, match="cut short inside its index"):
        media.probe(path)


def test_boxes_nested_too_deep_are_refused(tmp_path):
    nest = Box(b"free", b"")
    for _ in range(mp4_boxes.MAX_DEPTH + 2):
        nest = Box(b"udta", nest.serialize())
    boxes = parse(craft("none"))
    next(b for b in boxes if b.type == b"moov").children.append(nest)
    path = tmp_path / "deep.mp4"
    path.write_bytes(b"".join(b.serialize() for b in boxes))
    with pytest.raises(media.NotAVideo, match="nested more than"):
        media.probe(path)


def test_a_video_track_declaring_more_frames_than_the_cap_is_refused_before_demuxing(tmp_path):
    with pytest.raises(media.NotAVideo, match=r"more than 3 frames \(its index declares 5\)"):
        media.probe(media_file("mmpose_demo_960x540_5f.mp4"), media.Limits(max_frames=3))


def test_box_walk_reads_what_ffmpeg_reads(tmp_path):
    """Sizes 0 (to the parent's end) and 1 (64-bit), a child running past its parent clamped to it, and a
    table before any track ignored, as FFmpeg does."""
    data = craft("none")
    index = mp4_boxes.check(_io(data), len(data))
    assert [(t.handler, t.samples, t.timed, t.edits) for t in index.tracks] == [(b"vide", 5, 5, 1)]
    # The last box (mdat) written with size 0: to the end of the file.
    boxes = parse(data)
    tail = boxes[-1].serialize()
    zero = data[: len(data) - len(tail)] + struct.pack(">I4s", 0, b"mdat") + tail[8:]
    assert mp4_boxes.check(_io(zero), len(zero)).tracks[0].samples == 5
    # A forged stsz before any trak: FFmpeg ignores it, so does the walk.
    stray = Box(b"stsz", struct.pack(">III", 0, 0, TEN_MILLION)).serialize()
    assert mp4_boxes.check(_io(stray + data), len(data) + len(stray)).tracks[0].samples == 5


def _io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
