"""The built-in synthetic dataset: the default that runs everywhere.

A small ResNet (18-layer layout, width 16, GroupNorm, from scratch, Adam) on
small scenes, sized for a 2-core CPU; the dataset is generated into data.root
on first use (oim_jax/data/synthetic.py). Why each choice, with the measured
alternatives: docs/configs.md; runs and timings: docs/results.md.

  python train.py --config=configs/synthetic.py --workdir=runs/demo
  python train.py --config=configs/synthetic.py:long --workdir=runs/long
  python train.py --config=configs/synthetic.py:fast --workdir=runs/fast
"""

from oim_jax import config_defaults


def get_config(variant: str = ""):
  """Variants (`--config=configs/synthetic.py:NAME`):

  long: 30 epochs, lr x0.1 after 24 (higher mAP for 1.25x the time).
  fast: 15 epochs, lr x0.1 after 12, one evaluation before the last (~40 %
    less time for a few mAP points).
  """
  if variant not in ("", "long", "fast"):
    raise ValueError(f"configs/synthetic.py:{variant}: the variants are "
                     "'long' (30 epochs) and 'fast' (15 epochs)")
  c = config_defaults.base_config()
  c.data.dataset = "synthetic"
  c.data.root = "data/synthetic"
  c.data.min_size = 288
  c.data.max_size = 480
  c.data.max_gt = 8
  c.data.num_workers = 1
  # Generator sizes (oim_jax/data/synthetic.py, SyntheticConfig): 720 train /
  # 240 test scenes of 240x320 to 320x480 px, 675 train / 80 test identities.
  c.data.synthetic = dict(
      seed=0, num_train_ids=675, num_test_ids=80, num_train_scenes=720,
      num_test_scenes=240, min_persons=2, max_persons=6,
      min_train_appearances=3, max_train_appearances=5,
      min_test_appearances=2, max_test_appearances=4, num_cameras=6,
      min_person_height=40, max_person_height=160, image_scale=1.0,
      gallery_sizes=(50, 100), jpeg_quality=90)
  c.model = config_defaults.model_config("tiny")
  c.model.width = 16
  c.model.norm_groups = 4
  c.model.anchor_sizes = (32, 64, 128, 256)
  c.model.anchor_ratios = (1.0, 2.0, 3.0)  # h / w: standing people
  c.model.stride = 8  # RoI features from a stride-8 C4 (small people)
  c.model.rpn.stride = 16  # the RPN reads C4 averaged over 2x2 cells
  c.model.rpn.post_nms_top_n_test = 100
  c.model.roi.det_features = "spatial"
  c.model.roi.embedding_features = "spatial"
  c.model.embedding_bn_rois = "persons"
  c.model.loss_weights.reid = 0.5
  c.model.loss_weights.det_reg = 2.0  # localisation was the detector's gap
  c.model.roi.refine_iters = 2  # test: two more passes of the box head
  c.oim.num_labeled = 675
  c.oim.queue_size = 500
  c.train.batch_size = 4
  c.train.epochs = 24
  c.train.optimizer = "adam"
  c.train.lr = 1e-3
  c.train.warmup_epochs = 0.5
  c.train.lr_milestones = (19,)
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.eval.gallery_size = 50
  c.eval.every_steps = 1074  # 6 epochs: the mAP curve in curves.png
  c.eval.batch_size = 8
  c.eval.flip_test = True  # embeddings averaged with the mirrored image's
  if variant == "long":
    c.train.epochs = 30
    c.train.lr_milestones = (24,)
    c.eval.every_steps = 1343  # 7.5 epochs
  elif variant == "fast":
    c.train.epochs = 15
    c.train.lr_milestones = (12,)
    c.eval.every_steps = 1343  # 7.5 epochs: one mid-run point, then the end
  return c
