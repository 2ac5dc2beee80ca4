"""What a gallery holds: image files and video files, read as sampled frames.

A gallery is any mix of folders (walked recursively, in sorted order), image
files and video files. Every source yields `Frame`s: an image file one frame
(index 0, timestamp None), a video one frame every `every_frames` decoded
frames or every `every_seconds` of its timestamps. Videos are decoded with
PyAV (FFmpeg), imported only when a video is met.

A file that cannot be read raises `MediaError` naming it, so that a caller
can report and skip it; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg",
                    ".mpeg", ".ts")


class MediaError(Exception):
  """A gallery file that cannot be read (message names the file)."""


@dataclasses.dataclass(frozen=True)
class Frame:
  """One picture of a source.

  Attributes:
    index: frame number in the source (0 for an image file).
    timestamp: seconds from the start of a video; None for an image.
    data: encoded image bytes (the file itself, or a PNG of a video frame:
      lossless, so a frame is indexed exactly as its pixels).
    height, width: pixels.
  """
  index: int
  timestamp: Optional[float]
  data: bytes
  height: int
  width: int


def kind_of(path: str) -> Optional[str]:
  """"image", "video" or None, by the file name's extension."""
  name = path.lower()
  if name.endswith(IMAGE_EXTENSIONS):
    return "image"
  if name.endswith(VIDEO_EXTENSIONS):
    return "video"
  return None


def list_sources(paths: Sequence[str]) -> list[str]:
  """Image and video files under `paths` (files or folders), sorted per
  argument, each once.

  Raises:
    FileNotFoundError: an argument does not exist.
    ValueError: nothing indexable was found.
  """
  found, seen = [], set()
  for p in paths:
    if os.path.isdir(p):
      files = []
      for root, dirs, names in os.walk(p):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in names if kind_of(n))
      files.sort()
    elif os.path.isfile(p):
      if kind_of(p) is None:
        raise ValueError(
            f"{p}: not an image ({'/'.join(IMAGE_EXTENSIONS)}) or video "
            f"({'/'.join(VIDEO_EXTENSIONS)}) file")
      files = [p]
    else:
      raise FileNotFoundError(f"gallery path {p} does not exist")
    for f in files:
      key = os.path.abspath(f)
      if key not in seen:
        seen.add(key)
        found.append(f)
  if not found:
    raise ValueError(f"no image or video files under {', '.join(paths)}")
  return found


def read_image(path: str) -> Frame:
  """An image file as one frame, fully decoded once to prove it readable."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      w, h = im.size
  except Exception as e:  # PIL raises several types for corrupt files.
    raise MediaError(f"cannot read image {path}: {e}") from e
  return Frame(0, None, data, h, w)


def _png(rgb: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # compress_level=1: these bytes are decoded once, right away.
  Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def video_frames(path: str, every_frames: int = 0,
                 every_seconds: float = 0.0,
                 skip: frozenset[int] = frozenset()) -> Iterator[Frame]:
  """The sampled frames of a video file, in order.

  Args:
    path: the video file.
    every_frames: keep frames 0, N, 2N, ... (by decode order).
    every_seconds: keep the first frame at or after 0, S, 2S, ... seconds;
      used when every_frames is 0. Both 0: every frame.
    skip: frame indices not to encode (already indexed); they still count.

  Raises:
    MediaError: the file cannot be opened or decoding fails part-way (the
      frames yielded before stay valid).
  """
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MediaError(
        f"{path}: reading videos needs PyAV: pip install av") from e
  try:
    container = av.open(path)
  except Exception as e:
    raise MediaError(f"cannot open video {path}: {e}") from e
  with container:
    if not container.streams.video:
      raise MediaError(f"{path} has no video stream")
    stream = container.streams.video[0]
    next_time = 0.0
    try:
      for i, frame in enumerate(container.decode(stream)):
        t = float(frame.time) if frame.time is not None else None
        if every_frames > 0:
          keep = i % every_frames == 0
        elif every_seconds > 0:
          # Without timestamps, fall back to the stream's frame rate.
          if t is None:
            rate = float(stream.average_rate or 25)
            t = i / rate
          keep = t >= next_time - 1e-6
          if keep:
            while next_time <= t + 1e-6:
              next_time += every_seconds
        else:
          keep = True
        if not keep or i in skip:
          continue
        rgb = frame.to_ndarray(format="rgb24")
        yield Frame(i, t, _png(rgb), rgb.shape[0], rgb.shape[1])
    except MediaError:
      raise
    except Exception as e:  # FFmpeg errors on truncated or corrupt streams.
      raise MediaError(f"decoding video {path} failed: {e}") from e


def estimated_frames(path: str, every_frames: int = 0,
                     every_seconds: float = 0.0) -> int:
  """How many frames `video_frames` will yield, from the container header
  (for a progress bar; 1 when the header does not say)."""
  try:
    import av  # pylint: disable=g-import-not-at-top
    with av.open(path) as container:
      stream = container.streams.video[0]
      n = int(stream.frames or 0)
      duration = (float(stream.duration * stream.time_base)
                  if stream.duration else
                  (container.duration or 0) / 1e6)
      if not n and duration:
        n = int(round(duration * float(stream.average_rate or 25)))
  except Exception:  # pylint: disable=broad-except
    return 1
  if every_frames > 0:
    return max(1, -(-n // every_frames))
  if every_seconds > 0 and duration:
    return max(1, int(duration // every_seconds) + 1)
  return max(1, n)


def load_rgb(path: str, frame: int = 0,
             timestamp: Optional[float] = None) -> np.ndarray:
  """uint8 [H, W, 3] pixels of an image file, or of one video frame.

  A video frame is found by its timestamp when given (seek to the keyframe
  before it, decode forward), else by decoding `frame` frames from the start.

  Raises:
    MediaError: unreadable file, or the video has no such frame.
  """
  if kind_of(path) != "video":
    try:
      with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
    except Exception as e:  # pylint: disable=broad-except
      raise MediaError(f"cannot read image {path}: {e}") from e
  try:
    import av  # pylint: disable=g-import-not-at-top
    with av.open(path) as container:
      stream = container.streams.video[0]
      start = 0
      if timestamp is not None and stream.time_base:
        container.seek(int(timestamp / stream.time_base), stream=stream,
                       backward=True, any_frame=False)
        start = None  # decode order index unknown after a seek
      for i, f in enumerate(container.decode(stream)):
        if start is None:
          if f.time is not None and f.time >= timestamp - 1e-6:
            return f.to_ndarray(format="rgb24")
        elif i == frame:
          return f.to_ndarray(format="rgb24")
  except MediaError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise MediaError(f"cannot read frame {frame} of {path}: {e}") from e
  raise MediaError(f"{path} has no frame {frame} (t={timestamp})")
