"""The pixels group's frames: decoded views stored as uint8 with their valid box (Video-Panda trains on pixels),
made from the same decode as the encoders' frames. Through the CLI: `test_extract_groups.py`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dualfocus.extract.decode import decode_video
from dualfocus.extract.resize import FrameViews, fit_long_side


@pytest.fixture(scope="module")
def wide_clip(tmp_path_factory):
    """A 90 x 60 (width x height) clip of 3 s at 4 fps with a different pattern per frame."""
    from dualfocus.pipeline.toy import write_mp4

    rng = np.random.default_rng(0)
    small = [rng.integers(0, 256, (6, 9, 3), dtype=np.uint8) for _ in range(12)]
    frames = [np.asarray(Image.fromarray(s).resize((90, 60), Image.BICUBIC)) for s in small]
    path = tmp_path_factory.mktemp("wide") / "wide.mp4"
    write_mp4(path, frames, fps=4)
    return path


def test_fit_long_side_keeps_aspect_and_never_upscales():
    assert fit_long_side(60, 90, 45) == (30, 45)
    assert fit_long_side(90, 60, 45) == (45, 30)
    assert fit_long_side(60, 90, 90) == (60, 90) and fit_long_side(60, 90, 448) == (60, 90)
    assert fit_long_side(1, 1000, 10) == (1, 10)


def test_views_come_from_the_decoded_frame_itself(wide_clip):
    def chunks(size):
        _, timestamps, it = decode_video(wide_clip, 1.0, None, size, chunk_frames=16)
        return timestamps, list(it)

    ts, (square,) = chunks(32)
    _, (native,) = chunks(FrameViews(square=None, long_side=90))          # 90 >= the long side: as decoded
    _, (big,) = chunks(FrameViews(square=None, long_side=448))            # past the frame: kept, not upscaled
    _, (views,) = chunks(FrameViews(square=32, long_side=45))
    assert len(ts) == 3 and views["frames"].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(views["frames"], square)                  # the encoders' frames are unchanged
    assert native["frames"].shape == (3, 0, 0, 3) and (native["box"] == [60, 90]).all()
    frames = native["pixels"][:, :60, :90]
    assert native["pixels"].shape == (3, 90, 90, 3) and not native["pixels"][:, 60:].any()
    assert big["pixels"].shape == (3, 448, 448, 3) and (big["box"] == [60, 90]).all()   # the box records it
    np.testing.assert_array_equal(big["pixels"][:, :60, :90], frames)
    assert not big["pixels"][:, 60:].any() and not big["pixels"][:, :, 90:].any()
    assert views["pixels"].shape == (3, 45, 45, 3) and (views["box"] == [30, 45]).all()
    want = np.stack([np.asarray(Image.fromarray(f).resize((45, 30), Image.BICUBIC)) for f in frames])
    np.testing.assert_array_equal(views["pixels"][:, :30, :45], want)       # made from the decoded frame
    assert not views["pixels"][:, 30:].any()
    with pytest.raises(ValueError, match="long_side must be >= 1"):
        decode_video(wide_clip, 1.0, None, FrameViews(square=32, long_side=0))
