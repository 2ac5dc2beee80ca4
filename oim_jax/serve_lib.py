"""A small web page over a search index: pick or upload a query image, draw
the box, see the ranked crops with their source, time and a link to the
frame.

Standard library only (http.server): the page (oim_jax/web/index.html) talks
to a JSON API,

  GET  /api/images              indexed image files to pick a query from
  GET  /api/search?...          (or POST with an uploaded image, below)
  POST /api/search              {"image": data URL | "source": id,
                                 "box": [x1, y1, x2, y2], "top_k": k,
                                 "one_per_frame": bool, "min_score": s}
  GET  /media/source/ID         an indexed image file
  GET  /media/crop/ROW          a detection's crop (PNG)
  GET  /media/frame/ROW         its whole frame with the box drawn (PNG)

Files are addressed by their ids in the index, never by a path from the
request, so the server reads only indexed files. Queries are embedded one at
a time (a lock around the jit-compiled model).
"""

from __future__ import annotations

import base64
import binascii
import http.server
import io
import json
import os
import tempfile
import threading
import time
import urllib.parse
from typing import Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageDraw

from oim_jax import media
from oim_jax import search_index

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web",
                    "index.html")
MAX_UPLOAD_BYTES = 32 << 20
MAX_TOP_K = 200

# (image file, box [4]) -> [D] unit embedding.
EmbedFn = Callable[[str, Sequence[float]], np.ndarray]


class BadRequest(ValueError):
  pass


class SearchApp:
  """The API's logic, independent of HTTP (tests call it directly)."""

  def __init__(self, index_path: str, embed: EmbedFn):
    self.index_path = index_path
    self.embed = embed
    self._lock = threading.Lock()
    self._local = threading.local()

  def index(self) -> search_index.SearchIndex:
    # SQLite connections belong to one thread: one open index per thread.
    if not hasattr(self._local, "index"):
      self._local.index = search_index.SearchIndex.open(self.index_path)
    return self._local.index

  def images(self, limit: int = 2000) -> list[dict]:
    rows = self.index().db.execute(
        "SELECT id, path FROM sources WHERE kind='image' AND status='done' "
        "ORDER BY id LIMIT ?", (limit,)).fetchall()
    return [{"id": i, "name": os.path.basename(p), "path": p}
            for i, p in rows]

  def source_path(self, source_id: int) -> str:
    row = self.index().db.execute(
        "SELECT path, kind FROM sources WHERE id=?", (source_id,)).fetchone()
    if row is None:
      raise KeyError(f"no source {source_id}")
    return row[0]

  def detection(self, row: int) -> tuple[str, int, float, np.ndarray]:
    r = self.index().db.execute(
        "SELECT s.path, d.frame, f.timestamp, x1, y1, x2, y2 FROM detections "
        "d JOIN sources s ON s.id = d.source_id JOIN frames f ON "
        "f.source_id = d.source_id AND f.frame = d.frame WHERE d.id=?",
        (row,)).fetchone()
    if r is None:
      raise KeyError(f"no detection {row}")
    return r[0], r[1], r[2], np.asarray(r[3:], np.float32)

  def crop_png(self, row: int, margin: float = 0.15) -> bytes:
    path, frame, t, box = self.detection(row)
    rgb = media.load_rgb(path, frame, t)
    w, h = box[2] - box[0], box[3] - box[1]
    x1, y1 = max(0, int(box[0] - margin * w)), max(0, int(box[1] - margin * h))
    x2 = min(rgb.shape[1], int(np.ceil(box[2] + margin * w)))
    y2 = min(rgb.shape[0], int(np.ceil(box[3] + margin * h)))
    return _png(Image.fromarray(rgb[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]))

  def frame_png(self, row: int) -> bytes:
    path, frame, t, box = self.detection(row)
    im = Image.fromarray(media.load_rgb(path, frame, t))
    ImageDraw.Draw(im).rectangle([float(v) for v in box], outline=(0, 255, 0),
                                 width=3)
    return _png(im)

  def search(self, request: dict) -> dict:
    """The JSON search request (module docstring) -> ranked results."""
    try:
      box = [float(v) for v in request["box"]]
      top_k = int(request.get("top_k", 10))
      min_score = float(request.get("min_score", 0.0))
    except (KeyError, TypeError, ValueError) as e:
      raise BadRequest(f"bad search request ({e}): expected box "
                       "[x1, y1, x2, y2], top_k, min_score") from e
    if len(box) != 4 or not 1 <= top_k <= MAX_TOP_K:
      raise BadRequest(f"box needs 4 numbers and 1 <= top_k <= {MAX_TOP_K}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      if request.get("image"):
        image = os.path.join(tmp, "query")
        with open(image, "wb") as f:
          f.write(_data_url_bytes(request["image"]))
      elif request.get("source") is not None:
        try:
          image = self.source_path(int(request["source"]))
        except KeyError as e:
          raise BadRequest(str(e)) from e
      else:
        raise BadRequest("give an uploaded 'image' or an indexed 'source'")
      with self._lock:
        try:
          query = self.embed(image, box)
        except (ValueError, OSError) as e:  # box outside, unreadable image
          raise BadRequest(str(e)) from e
    t1 = time.perf_counter()
    matches = self.index().search(
        query, top_k, min_score=min_score,
        one_per_frame=_true(request.get("one_per_frame", False)))
    t2 = time.perf_counter()
    return {
        "embed_ms": 1e3 * (t1 - t0), "search_ms": 1e3 * (t2 - t1),
        "detections": self.index().num_rows,
        "results": [{
            "rank": m.rank, "similarity": m.similarity, "score": m.score,
            "source": m.image, "name": os.path.basename(m.image),
            "frame": m.frame, "timestamp": m.timestamp,
            "box": [float(v) for v in m.box],
            "crop": f"/media/crop/{m.id}", "frame_url": f"/media/frame/{m.id}",
        } for m in matches]}


def _true(value) -> bool:
  """A JSON boolean, or a query-string one ("1", "true", "on")."""
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "on", "yes")
  return bool(value)


def _png(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def _data_url_bytes(url: str) -> bytes:
  _, _, payload = url.partition(",")
  try:
    data = base64.b64decode(payload or url, validate=True)
  except (binascii.Error, ValueError) as e:
    raise BadRequest("the uploaded image is not base64 data") from e
  if len(data) > MAX_UPLOAD_BYTES:
    raise BadRequest(f"uploaded image over {MAX_UPLOAD_BYTES >> 20} MiB")
  return data


def make_handler(app: SearchApp):
  """An http.server handler class serving `app`."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # to absl, not stderr
      logging.info("%s %s", self.address_string(), fmt % args)

    def _send(self, code, body: bytes, ctype: str):
      self.send_response(code)
      self.send_header("Content-Type", ctype)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      self.end_headers()
      self.wfile.write(body)

    def _json(self, code, obj):
      self._send(code, json.dumps(obj).encode(), "application/json")

    def _dispatch(self, fn):
      try:
        fn()
      except BadRequest as e:
        self._json(400, {"error": str(e)})
      except (KeyError, media.MediaError) as e:
        self._json(404, {"error": str(e).strip("'\"")})

    def do_GET(self):  # pylint: disable=invalid-name
      url = urllib.parse.urlparse(self.path)
      parts = url.path.strip("/").split("/")

      def get():
        if url.path in ("/", "/index.html"):
          with open(PAGE, "rb") as f:
            self._send(200, f.read(), "text/html; charset=utf-8")
        elif url.path == "/api/images":
          self._json(200, {"images": app.images()})
        elif url.path == "/api/search":
          q = dict(urllib.parse.parse_qsl(url.query))
          q["box"] = q.get("box", "").split(",")
          self._json(200, app.search(q))
        elif len(parts) == 3 and parts[0] == "media" and parts[2].isdigit():
          kind, i = parts[1], int(parts[2])
          if kind == "source":
            with open(app.source_path(i), "rb") as f:
              data = f.read()
            self._send(200, data, Image.MIME.get(
                Image.open(io.BytesIO(data)).format, "image/jpeg"))
          elif kind == "crop":
            self._send(200, app.crop_png(i), "image/png")
          elif kind == "frame":
            self._send(200, app.frame_png(i), "image/png")
          else:
            raise KeyError(url.path)
        else:
          raise KeyError(f"no page {url.path}")
      self._dispatch(get)

    def do_POST(self):  # pylint: disable=invalid-name
      def post():
        if self.path != "/api/search":
          raise KeyError(f"no API {self.path}")
        n = int(self.headers.get("Content-Length", 0))
        if n > 2 * MAX_UPLOAD_BYTES:
          raise BadRequest("request too large")
        try:
          request = json.loads(self.rfile.read(n) or b"{}")
        except json.JSONDecodeError as e:
          raise BadRequest(f"request is not JSON: {e}") from e
        self._json(200, app.search(request))
      self._dispatch(post)

  return Handler


def make_server(app: SearchApp, host: str = "127.0.0.1", port: int = 8000
                ) -> http.server.ThreadingHTTPServer:
  """A bound server for `app`: .serve_forever() runs it (port 0: any free
  port, see .server_address)."""
  server = http.server.ThreadingHTTPServer((host, port), make_handler(app))
  server.daemon_threads = True
  return server
