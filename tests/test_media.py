"""Gallery files: listing, images, sampled video frames, bad files."""

import os

import numpy as np
from PIL import Image
import pytest

from oim_jax import media

from conftest import write_video


def _frames(n, h=48, w=64, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _decode_png(data):
  import io
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def test_list_sources_walks_sorted_and_deduplicates(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "a" / "z").mkdir(parents=True)
  for name in ["b/2.jpg", "b/1.PNG", "a/z/v.mp4", "a/0.png", "a/notes.txt"]:
    (tmp_path / name).write_bytes(b"x")
  got = media.list_sources([str(tmp_path), str(tmp_path / "b" / "2.jpg")])
  rel = [os.path.relpath(p, tmp_path) for p in got]
  assert rel == ["a/0.png", "a/z/v.mp4", "b/1.PNG", "b/2.jpg"]
  with pytest.raises(FileNotFoundError, match="nowhere"):
    media.list_sources([str(tmp_path / "nowhere")])
  with pytest.raises(ValueError, match="notes.txt: not an image"):
    media.list_sources([str(tmp_path / "a" / "notes.txt")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image or video"):
    media.list_sources([str(tmp_path / "empty")])


def test_read_image_and_corrupt_image(tmp_path):
  rgb = _frames(1)[0]
  Image.fromarray(rgb).save(tmp_path / "ok.png")
  f = media.read_image(str(tmp_path / "ok.png"))
  assert (f.index, f.timestamp, f.height, f.width) == (0, None, 48, 64)
  np.testing.assert_array_equal(_decode_png(f.data), rgb)
  np.testing.assert_array_equal(media.load_rgb(str(tmp_path / "ok.png")), rgb)
  # A truncated JPEG: the header reads, the pixels do not.
  Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=90)
  data = (tmp_path / "full.jpg").read_bytes()
  (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
  with pytest.raises(media.MediaError, match="cut.jpg"):
    media.read_image(str(tmp_path / "cut.jpg"))


def test_lossless_video_frames_and_sampling(tmp_path):
  frames = _frames(10)
  path = str(tmp_path / "v.mkv")
  write_video(path, frames, fps=4)
  every = list(media.video_frames(path))
  assert [f.index for f in every] == list(range(10))
  assert [f.timestamp for f in every] == pytest.approx(
      [i / 4 for i in range(10)])
  for f, rgb in zip(every, frames):
    np.testing.assert_array_equal(_decode_png(f.data), rgb)
  assert [f.index for f in media.video_frames(path, every_frames=3)] == [
      0, 3, 6, 9]
  # Every 0.6 s at 4 fps: the first frame at or after 0, 0.6, 1.2, 1.8, 2.4.
  assert [f.index for f in media.video_frames(path, every_seconds=0.6)] == [
      0, 3, 5, 8]
  assert [f.index for f in media.video_frames(
      path, every_frames=3, skip=frozenset({0, 6}))] == [3, 9]
  assert media.estimated_frames(path, every_frames=3) == 4
  np.testing.assert_array_equal(media.load_rgb(path, 7, 7 / 4), frames[7])
  np.testing.assert_array_equal(media.load_rgb(path, 7), frames[7])


def test_lossy_mp4_decodes(tmp_path):
  frames = _frames(8, seed=1)
  path = str(tmp_path / "v.mp4")
  write_video(path, [np.full_like(f, 120) for f in frames], fps=4,
              codec="mpeg4")
  got = list(media.video_frames(path, every_frames=2))
  assert [f.index for f in got] == [0, 2, 4, 6]
  assert abs(_decode_png(got[1].data).astype(int) - 120).max() <= 3


def test_corrupt_and_truncated_videos_raise(tmp_path):
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"this is not a video" * 100)
  with pytest.raises(media.MediaError, match="bad.mp4"):
    list(media.video_frames(str(bad)))
  path = tmp_path / "v.mkv"
  write_video(str(path), _frames(12), fps=4)
  data = path.read_bytes()
  cut = tmp_path / "cut.mkv"
  cut.write_bytes(data[:len(data) // 2])
  # Decoding stops early or raises; it never yields more than it has.
  try:
    n = len(list(media.video_frames(str(cut))))
  except media.MediaError as e:
    assert "cut.mkv" in str(e)
  else:
    assert n < 12
