"""mesh/jpeg.py: decoding into kept buffers gives the same pictures as a fresh decode, and keeps memory bounded;
decoded video frames go to JPEG in their own colours (mesh/media.py's frame_jpeg)."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from posemesh.mesh import jpeg, media
from tests.conftest import media as media_file


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    picture = cv2.resize(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8), (width, height))
    return jpeg.encode(picture, 80)


def test_pictures_are_the_fresh_decodes_and_buffers_are_reused_only_after_recycle():
    pictures = jpeg.Pictures()
    first, second = _jpeg(640, 360, 1), _jpeg(640, 360, 2)
    a, b = pictures.decode(first), pictures.decode(second)
    assert np.array_equal(a, jpeg.decode(first)) and np.array_equal(b, jpeg.decode(second))
    assert not np.shares_memory(a, b)  # one batch: each picture has a buffer of its own
    pictures.recycle()
    c, d = pictures.decode(second), pictures.decode(first)
    # The next batch writes over the last one's buffers, each picture still in a buffer of its own.
    assert np.shares_memory(c, a) or np.shares_memory(c, b)
    assert (np.shares_memory(d, a) or np.shares_memory(d, b)) and not np.shares_memory(c, d)
    assert np.array_equal(c, jpeg.decode(second)) and np.array_equal(d, jpeg.decode(first))


def test_a_buffer_is_reused_only_for_a_picture_of_about_its_size():
    pictures = jpeg.Pictures()
    big = pictures.decode(_jpeg(1280, 720, 3))
    pictures.recycle()
    small = pictures.decode(_jpeg(320, 180, 4))  # 1/16 of the big one: a buffer of its own
    assert not np.shares_memory(small, big)
    assert small.shape == (180, 320, 3)


def test_the_smallest_kept_buffer_that_fits_is_taken():
    pictures = jpeg.Pictures()
    big, small = pictures.decode(_jpeg(704, 400, 5)), pictures.decode(_jpeg(640, 360, 6))
    pictures.recycle()
    again = pictures.decode(_jpeg(640, 360, 7))  # both fit (704x400 is within 2x): the smaller is used
    assert np.shares_memory(again, small) and not np.shares_memory(again, big)


def test_a_buffer_over_the_budget_alone_does_not_push_the_smaller_ones_out(monkeypatch):
    monkeypatch.setattr(jpeg.Pictures, "RETAIN_BYTES", 2 * 640 * 360 * 3)
    pictures = jpeg.Pictures()
    pictures.decode(_jpeg(1280, 720, 8))  # 4x the small ones: over the budget on its own
    pictures.decode(_jpeg(640, 360, 9))
    pictures.recycle()
    assert [b.size for b in pictures.free] == [640 * 360 * 3]


def test_buffers_kept_between_batches_are_bounded(monkeypatch):
    monkeypatch.setattr(jpeg.Pictures, "RETAIN_BYTES", 3 * 640 * 360 * 3)
    pictures = jpeg.Pictures()
    for seed in range(5):
        pictures.decode(_jpeg(640, 360, seed))
    pictures.recycle()
    assert len(pictures.free) == 3 and not pictures.lent


def test_an_undecodable_frame_is_a_bad_jpeg():
    with pytest.raises(jpeg.BadJpeg):
        jpeg.Pictures().decode(b"\xff\xd8 not a picture")


# ---------------------------------------------------------------- decoded video frames to JPEG (media.frame_jpeg)


def _first_frame(name: str) -> av.VideoFrame:
    with av.open(str(media_file(name))) as container:
        return next(container.decode(video=0))


def test_an_untagged_video_frame_goes_to_jpeg_from_its_planes_in_truer_colours_than_through_bgr():
    frame = _first_frame("towncentre_1080p_302f.mp4")  # yuv420p, limited range, no colour space tag
    assert media.jfif_planes(frame) is not None
    data, width, height = media.frame_jpeg(frame, 80)
    assert (width, height) == (1920, 1080)
    # OpenCV's own conversion of the decoder's planes (BT.601, limited range) says what the frame looks like.
    exact = cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2BGR_I420).astype(np.float32)
    planes_error = np.abs(jpeg.decode(data).astype(np.float32) - exact)
    through_bgr = jpeg.decode(jpeg.encode(frame.to_ndarray(format="bgr24"), 80)).astype(np.float32)
    # Measured: 1.11 against 1.63 (FFmpeg's integer conversion to BGR is about one level dark; bench/frame_jpeg.py).
    assert planes_error.mean() < 1.3 and abs((jpeg.decode(data) - exact).mean()) < 0.3
    assert planes_error.mean() < np.abs(through_bgr - exact).mean()


def test_a_frame_tagged_bt709_goes_to_jpeg_through_bgr_in_its_own_colours():
    frame = _first_frame("vtest_opencv_480x360.mp4")  # yuv420p tagged BT.709: JFIF would read it as BT.601
    assert frame.colorspace == 1 and media.jfif_planes(frame) is None
    data, width, height = media.frame_jpeg(frame, 90)
    assert (width, height) == (480, 360) and data == jpeg.encode(frame.to_ndarray(format="bgr24"), 90)


def test_a_full_range_frame_goes_to_jpeg_from_its_planes_unstretched():
    frame = _first_frame("mmpose_demo_960x540_5f.mp4").reformat(format="yuvj420p")
    assert media.jfif_planes(frame) is not None
    data, _w, _h = media.frame_jpeg(frame, 90)
    assert np.abs(jpeg.decode(data).astype(np.int16) - frame.to_ndarray(format="bgr24")).mean() < 2.0


def test_a_turned_frame_comes_out_upright_either_way():
    frame = _first_frame("mmpose_demo_960x540_5f.mp4")
    upright = cv2.rotate(frame.to_ndarray(format="bgr24"), cv2.ROTATE_90_CLOCKWISE)
    for turned in (frame, frame.reformat(format="yuv444p")):  # from its planes; through BGR
        data, width, height = media.frame_jpeg(turned, 90, clockwise=90)
        assert (width, height) == (540, 960)
        assert np.abs(jpeg.decode(data).astype(np.int16) - upright).mean() < 3.0
