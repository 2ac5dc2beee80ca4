"""serve.py's web page: the JSON API (no model), and the page driven in a
real headless browser (Chromium via Selenium) on the tiny trained model."""

import base64
import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
import pytest

from oim_jax import search_index
from oim_jax import serve_lib

DIM = 4


def _fake_index(tmp_path):
  """Two indexed PNGs with three detections; returns (path, images)."""
  rng = np.random.default_rng(0)
  images = []
  for i in range(2):
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    images.append(rgb)
    Image.fromarray(rgb).save(tmp_path / f"im{i}.png")
  manifest = {"embedding_dim": DIM, "workdir": "-", "checkpoint_step": 0,
              "det_thresh": 0.0, "sampling": {}, "config": {}}
  emb = np.eye(DIM, dtype=np.float32)[[0, 1, 2]]
  with search_index.SearchIndex.create_or_open(str(tmp_path / "idx"),
                                               manifest) as index:
    s0 = index.source_id(str(tmp_path / "im0.png"), "image")
    s1 = index.source_id(str(tmp_path / "im1.png"), "image")
    index.add_batch([(s0, 0, None, 60, 80), (s1, 0, None, 60, 80)],
                    [(s0, 0, np.array([10, 10, 30, 50]), 0.9),
                     (s1, 0, np.array([40, 0, 80, 20]), 0.8),
                     (s1, 0, np.array([0, 0, 20, 40]), 0.7)], emb)
    index.set_status(s0, "done")
    index.set_status(s1, "done")
  return str(tmp_path / "idx"), images


def _get(url, data=None):
  req = urllib.request.Request(url, data=data)
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, r.headers.get("Content-Type"), r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers.get("Content-Type"), e.read()


@pytest.fixture
def fake_server(tmp_path):
  path, images = _fake_index(tmp_path)
  calls = []

  def embed(image, box):  # the query box's position picks the embedding
    calls.append((image, list(box)))
    v = np.array([1.0, 2.0, 0.5, 0.0], np.float32) if box[0] < 20 else \
        np.array([0.0, 0.2, 1.0, 0.0], np.float32)
    return v / np.linalg.norm(v)

  server = serve_lib.make_server(serve_lib.SearchApp(path, embed), port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}", images, calls, tmp_path
  server.shutdown()
  server.server_close()


def test_api_search_crops_frames_and_errors(fake_server):
  url, images, calls, tmp_path = fake_server
  code, ctype, body = _get(url + "/")
  assert code == 200 and b"Person search" in body and "html" in ctype
  code, _, body = _get(url + "/api/images")
  listed = json.loads(body)["images"]
  assert [i["name"] for i in listed] == ["im0.png", "im1.png"]

  # Query: an indexed image; the similarity order is 1 > 0 > 2 (dot
  # products 2, 1, 0.5 over sqrt(5.25)).
  req = json.dumps({"source": listed[0]["id"], "box": [1, 2, 15, 40],
                    "top_k": 2}).encode()
  code, _, body = _get(url + "/api/search", req)
  out = json.loads(body)
  assert code == 200, out
  assert calls[-1] == (str(tmp_path / "im0.png"), [1.0, 2.0, 15.0, 40.0])
  assert [r["box"] for r in out["results"]] == [[40, 0, 80, 20],
                                                [10, 10, 30, 50]]
  np.testing.assert_allclose([r["similarity"] for r in out["results"]],
                             np.array([2.0, 1.0]) / np.sqrt(5.25), rtol=1e-6)
  assert out["detections"] == 3 and out["results"][0]["name"] == "im1.png"

  # The crop: box (40, 0, 80, 20) + 15 % margin, clipped to the 80x60 image.
  code, ctype, body = _get(url + out["results"][0]["crop"])
  crop = np.asarray(Image.open(io.BytesIO(body)))
  assert code == 200 and ctype == "image/png"
  np.testing.assert_array_equal(crop, images[1][0:23, 34:80])
  code, _, body = _get(url + out["results"][0]["frame_url"])
  frame = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
  assert frame.shape == (60, 80, 3)
  assert (frame[10, 40] == [0, 255, 0]).all()  # the box's left edge
  np.testing.assert_array_equal(frame[30:, :30], images[1][30:, :30])

  # Query: an upload (the other embedding), and GET with a query string.
  buf = io.BytesIO()
  Image.fromarray(images[0]).save(buf, format="PNG")
  data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  code, _, body = _get(url + "/api/search", json.dumps(
      {"image": data, "box": [30, 1, 50, 30], "top_k": 1}).encode())
  assert code == 200 and json.loads(body)["results"][0]["box"] == [0, 0, 20,
                                                                    40]
  code, _, body = _get(url + f"/api/search?source={listed[1]['id']}"
                       "&box=1,2,3,4&top_k=3")
  assert code == 200 and len(json.loads(body)["results"]) == 3
  # Two of the three detections share a frame: one per frame keeps 2.
  for flag, n in [("true", 2), ("false", 3), ("0", 3)]:
    code, _, body = _get(url + f"/api/search?source={listed[1]['id']}"
                         f"&box=1,2,3,4&top_k=3&one_per_frame={flag}")
    assert code == 200 and len(json.loads(body)["results"]) == n, flag

  # Errors: a message and a 4xx, never a traceback or a file outside.
  for path, data, want in [
      ("/api/search", b"not json", 400), ("/api/search", b'{"box": [1]}', 400),
      ("/api/search", json.dumps({"box": [1, 2, 3, 4]}).encode(), 400),
      ("/api/search", json.dumps({"source": 99, "box": [1, 2, 3, 4]}).encode(),
       400),
      ("/media/crop/77", None, 404), ("/media/source/9", None, 404),
      ("/media/source/..%2F..%2Fetc%2Fpasswd", None, 404),
      ("/nothing", None, 404)]:
    code, ctype, body = _get(url + path, data)
    assert code == want and "error" in json.loads(body), (path, code, body)


def _browser():
  try:
    from selenium import webdriver  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("no selenium: pip install selenium (CI installs it)")
  binary = shutil.which("chromium") or shutil.which("chromium-browser") or \
      shutil.which("google-chrome")
  driver = shutil.which("chromedriver")
  if not binary or not driver:
    pytest.skip("no browser: apt-get install chromium chromium-driver "
                "(CI installs them)")
  opts = webdriver.ChromeOptions()
  opts.binary_location = binary
  for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
            "--window-size=1300,900", "--disable-gpu"):
    opts.add_argument(a)
  return webdriver.Chrome(options=opts,
                          service=webdriver.ChromeService(driver))


@pytest.mark.slow
def test_page_in_a_headless_browser(tiny_trained_workdir, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select, WebDriverWait  # pylint: disable=g-import-not-at-top
  from oim_jax import eval_lib, indexing, search_lib  # pylint: disable=g-import-not-at-top
  from oim_jax.data import datasets  # pylint: disable=g-import-not-at-top
  browser = _browser()
  workdir, config, _ = tiny_trained_workdir
  config = config.copy_and_resolve_references()
  config.model.roi.score_thresh = 0.0  # a 2-step model is not confident
  params, step = eval_lib.restore_params(config, workdir)
  dataset = datasets.load_dataset(config.data)
  folder = tmp_path / "photos"
  folder.mkdir()
  for a in dataset.gallery[:6]:
    shutil.copy(a.path, folder / a.name)
  out = str(tmp_path / "index")
  inference = eval_lib.Inference(config, params)
  indexing.build(config, params, [str(folder)], out, workdir=workdir,
                 step=step, det_thresh=0.0, inference=inference,
                 progress=False)
  embed = lambda p, b: search_lib.embed_query(inference, p, b)
  server = serve_lib.make_server(serve_lib.SearchApp(out, embed), port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    wait = WebDriverWait(browser, 120)
    browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
    pick = browser.find_element(By.ID, "pick")
    wait.until(lambda d: pick.get_attribute("data-ready") == "1")
    options = [o.text for o in Select(pick).options][1:]
    assert options == sorted(os.listdir(folder))
    Select(pick).select_by_index(1)
    canvas = browser.find_element(By.ID, "canvas")
    wait.until(lambda d: canvas.get_attribute("data-ready") == "1")
    ActionChains(browser).move_to_element_with_offset(canvas, -40, -60) \
        .click_and_hold().move_to_element_with_offset(canvas, 10, 50) \
        .release().perform()
    box = [float(browser.find_element(By.ID, k).get_attribute("value"))
           for k in ("x1", "y1", "x2", "y2")]
    assert box[0] < box[2] and box[1] < box[3], box
    top = browser.find_element(By.ID, "top_k")
    top.clear()
    top.send_keys("5")
    browser.find_element(By.ID, "search").click()
    status = browser.find_element(By.ID, "status")
    wait.until(lambda d: status.get_attribute("data-done"))
    cards = browser.find_elements(By.CLASS_NAME, "result")
    assert len(cards) == 5
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.result img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"))
    shown = [float(c.find_element(By.CLASS_NAME, "sim").text) for c in cards]
    # The page's ranking = the index's for the box it sent.
    query = search_lib.embed_query(inference, str(folder / options[0]), box)
    with search_index.SearchIndex.open(out) as index:
      want = [m.similarity for m in index.search(query, 5)]
    np.testing.assert_allclose(shown, want, atol=6e-4)
    shot = os.environ.get("OIM_JAX_SERVE_SCREENSHOT",
                          str(tmp_path / "page.png"))
    browser.save_screenshot(shot)
    assert Image.open(shot).size[0] > 0
  finally:
    browser.quit()
    server.shutdown()
    server.server_close()
