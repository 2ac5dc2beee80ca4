"""The PyTorch route a user would pick instead: torchvision Faster R-CNN C4.

  python bench/torch_reference.py --height 900 --width 1500 [--batch 1]
      [--iters 2] [--threads N] [--device cpu|cuda] [--dtype float32|bfloat16]

An optional benchmark dependency only (never imported by oim_jax or the
tests). The same detector as oim_jax's ResNet-50 person-search model, built
from torchvision parts with the same sizes:

  * backbone: resnet50 conv1..layer3 (C4, stride 16, 1024 channels), frozen
    BatchNorm (FrozenBatchNorm2d), conv1 + layer1 frozen (freeze_at=2);
  * RPN: AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
    3x3 conv head at 1024 channels, pre/post-NMS top-n 12000/2000 (train)
    and 6000/300 (test), NMS 0.7, 256 anchors per image;
  * RoI head: MultiScaleRoIAlign(["0"], 14, 2) -> layer4 -> global average
    pool -> FastRCNNPredictor(2048, 2), 128 RoIs per image (fg fraction 0.5),
    test score >= 0.5, NMS 0.4, 100 detections;
  * plus the 2048 -> 256 embedding (L2-normalised) and, in training, an
    OIM-sized re-id loss (softmax over 5532 + 5000 table rows at scale 30) so
    that both sides do the same work;
  * inference re-pools and embeds 100 final boxes per image (the detections,
    topped up with proposals: oim_jax always embeds a fixed 100).

torchvision's transform normalises and resizes (min_size 900, max_size
1500): a 900x1500 input keeps its size and is padded to 928x1504, the
canvas oim_jax uses. Train step = forward with targets + losses, backward,
gradient clipping at norm 10, SGD momentum 0.9 with weight decay 5e-4.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

NUM_LABELED, QUEUE, EMB_DIM, SCALAR = 5532, 5000, 256, 30.0


class EmbeddingPredictor(nn.Module):
  """FastRCNNPredictor(2048, 2) plus the 2048 -> 256 re-id embedding."""

  def __init__(self, in_channels: int = 2048):
    super().__init__()
    self.det = FastRCNNPredictor(in_channels, 2)
    self.embed = nn.Linear(in_channels, EMB_DIM)
    self.last_embeddings = None

  def forward(self, x):
    self.last_embeddings = F.normalize(self.embed(x), dim=-1)
    return self.det(x)


def build_model(height: int, width: int) -> FasterRCNN:
  r = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
  backbone = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1,
                           r.layer2, r.layer3)
  backbone.out_channels = 1024
  for m in (r.conv1, r.layer1):  # freeze_at=2: conv1 and res2
    for prm in m.parameters():
      prm.requires_grad_(False)
  box_head = nn.Sequential(r.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
  return FasterRCNN(
      backbone, num_classes=None,
      min_size=min(height, width), max_size=max(height, width),
      rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),),
                                           ((0.5, 1.0, 2.0),)),
      rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=2000,
      rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=300,
      rpn_nms_thresh=0.7, rpn_batch_size_per_image=256,
      box_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
      box_head=box_head, box_predictor=EmbeddingPredictor(2048),
      box_batch_size_per_image=128, box_positive_fraction=0.5,
      box_score_thresh=0.5, box_nms_thresh=0.4, box_detections_per_img=100)


def random_inputs(rng, batch, height, width, num_gt, device):
  images, targets = [], []
  for _ in range(batch):
    images.append(torch.from_numpy(
        rng.random((3, height, width), dtype=np.float32)).to(device))
    bw = rng.uniform(0.05, 0.2, num_gt) * width
    bh = np.minimum(bw * rng.uniform(2.0, 3.0, num_gt), 0.9 * height)
    x1 = rng.uniform(0, width - bw)
    y1 = rng.uniform(0, height - bh)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)
    targets.append({"boxes": torch.from_numpy(boxes).to(device),
                    "labels": torch.ones(num_gt, dtype=torch.int64,
                                         device=device)})
  return images, targets


def reid_loss(emb, table, rng_t):
  """OIM-sized loss: scaled cosine logits over LUT + queue, half labeled."""
  n = emb.shape[0]
  labels = torch.randint(0, NUM_LABELED, (n,), generator=rng_t)
  labels[::2] = -100  # unlabeled / background: ignored
  logits = SCALAR * emb @ table.t()
  return F.cross_entropy(logits.float(), labels.to(emb.device),
                         ignore_index=-100)


@torch.no_grad()
def detect_and_embed(model, images):
  """Detections + embeddings of 100 boxes per image (as oim_jax.detect)."""
  im, _ = model.transform(images)
  feats = model.backbone(im.tensors)
  feats = {"0": feats}
  proposals, _ = model.rpn(im, feats)
  dets, _ = model.roi_heads(feats, proposals, im.image_sizes)
  boxes = []
  for d, p in zip(dets, proposals):
    b = d["boxes"]
    if b.shape[0] < 100:  # top up with proposals: a fixed 100 per image
      b = torch.cat([b, p[:100 - b.shape[0]]])
    boxes.append(b[:100])
  x = model.roi_heads.box_roi_pool(feats, boxes, im.image_sizes)
  x = model.roi_heads.box_head(x)
  emb = F.normalize(model.roi_heads.box_predictor.embed(x), dim=-1)
  return dets, emb


def time_parts(model, images, iters, device):
  """Per-part times of the train step (as bench/train_breakdown.py)."""
  model.train()
  out = {}
  im, _ = model.transform(images)
  x = im.tensors

  def part(name, fn):
    fn()
    out[name] = statistics.median(timed(fn, iters, device))

  with torch.no_grad():
    part("stem_fwd", lambda: model.backbone(x))
    c4 = model.backbone(x)

  def stem_bwd():
    y = model.backbone(x)
    y.backward(torch.ones_like(y))
  part("stem_fwd_bwd", stem_bwd)
  c4 = c4.detach().requires_grad_(True)

  def rpn_bwd():
    logits, deltas = model.rpn.head([c4])
    (logits[0].sum() + deltas[0].sum()).backward()
  part("rpn_fwd_bwd", rpn_bwd)

  def proposals():
    with torch.no_grad():
      logits, deltas = model.rpn.head([c4])
      anchors = model.rpn.anchor_generator(im, [c4])
      n = logits[0].shape[0]
      shapes = [o[0].shape for o in logits]
      counts = [s[0] * s[1] * s[2] for s in shapes]
      from torchvision.models.detection.rpn import concat_box_prediction_layers
      obj, reg = concat_box_prediction_layers(logits, deltas)
      props = model.rpn.box_coder.decode(reg.detach(), anchors).view(n, -1, 4)
      return model.rpn.filter_proposals(props, obj.detach(), im.image_sizes,
                                        counts)
  part("proposals", proposals)
  g = np.random.default_rng(0)
  k = 128
  h, w = images[0].shape[1:]
  bw = g.uniform(20, min(300, w / 3), k)
  bh = g.uniform(40, min(600, h / 2), k)
  x1, y1 = g.uniform(0, w - bw), g.uniform(0, h - bh)
  boxes = [torch.from_numpy(np.stack([x1, y1, x1 + bw, y1 + bh], 1)
                            .astype(np.float32)).to(device)]
  pool = model.roi_heads.box_roi_pool

  def roi_bwd():
    r = pool({"0": c4}, boxes, im.image_sizes)
    r.sum().backward()
  part("roi_align_fwd_bwd", roi_bwd)
  with torch.no_grad():
    rois = pool({"0": c4}, boxes, im.image_sizes)
  rois.requires_grad_(True)

  def head_bwd():
    f = model.roi_heads.box_head(rois)
    cls, reg = model.roi_heads.box_predictor(f)
    emb = model.roi_heads.box_predictor.last_embeddings
    (cls.sum() + reg.sum() + emb.sum()).backward()
  part("res5_fwd_bwd", head_bwd)
  return out


def sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def timed(fn, iters, device):
  times = []
  for _ in range(iters):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    times.append(time.perf_counter() - t)
  return times


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--height", type=int, default=900)
  p.add_argument("--width", type=int, default=1500)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--num_gt", type=int, default=4)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--device", default="cpu")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--skip", default="", help="comma list: infer,train")
  p.add_argument("--parts", action="store_true",
                 help="also time the train step's parts separately")
  a = p.parse_args()
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  device = torch.device(a.device)
  rng = np.random.default_rng(0)
  model = build_model(a.height, a.width).to(device)
  images, targets = random_inputs(rng, a.batch, a.height, a.width, a.num_gt,
                                  device)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
              if a.dtype == "bfloat16" else torch.autocast(device.type,
                                                           enabled=False))
  out = {"what": "torch", "height": a.height, "width": a.width,
         "batch": a.batch, "threads": torch.get_num_threads(),
         "device": str(device), "dtype": a.dtype,
         "torch_version": torch.__version__,
         "torchvision_version": torchvision.__version__,
         "ld_preload": os.environ.get("LD_PRELOAD", "")}
  skip = set(filter(None, a.skip.split(",")))

  if "infer" not in skip:
    model.eval()

    def infer():
      with autocast:
        dets, emb = detect_and_embed(model, images)
      return dets, emb
    dets, emb = infer()  # warm-up
    t = timed(infer, a.iters, device)
    out.update(infer_s=statistics.median(t), infer_times=t,
               infer_images_per_s=a.batch / statistics.median(t),
               infer_detections=int(dets[0]["boxes"].shape[0]),
               infer_embeddings=int(emb.shape[0]))

  if "train" not in skip:
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=5e-4)
    table = F.normalize(torch.randn(NUM_LABELED + QUEUE, EMB_DIM), dim=-1)
    table = table.to(device)
    rng_t = torch.Generator().manual_seed(0)

    def step():
      with autocast:
        losses = model(images, targets)
        emb = model.roi_heads.box_predictor.last_embeddings
        loss = sum(losses.values()) + reid_loss(emb, table, rng_t)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 10.0)
      opt.step()
      return loss
    loss = step()  # warm-up
    t = timed(step, a.iters, device)
    out.update(train_s=statistics.median(t), train_times=t,
               train_images_per_s=a.batch / statistics.median(t),
               train_loss=float(loss.detach()),
               train_rois=int(model.roi_heads.box_predictor
                              .last_embeddings.shape[0]))
  if a.parts:
    out["parts"] = time_parts(model, images, a.iters, device)
  out["peak_rss_gib"] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  if device.type == "cuda":
    out["device_peak_gib"] = torch.cuda.max_memory_allocated() / 1024 ** 3
  print(json.dumps(out))


if __name__ == "__main__":
  main()
