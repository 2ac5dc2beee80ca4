"""The built-in synthetic dataset: the default that runs everywhere.

A tiny ResNet (18-layer layout, width 8, from scratch) on small scenes,
sized to learn on a 2-core CPU in minutes. The dataset is generated into
data.root on first use (oim_jax/data/synthetic.py).

  python train.py --config=configs/synthetic.py --workdir=runs/demo
"""

from oim_jax import config_defaults
from oim_jax.models import person_search


def get_config():
  c = config_defaults.base_config()
  c.data.dataset = "synthetic"
  c.data.root = "data/synthetic"
  c.data.min_size = 288
  c.data.max_size = 480
  c.data.max_gt = 8
  c.data.num_workers = 1
  # Generator sizes (oim_jax/data/synthetic.py, SyntheticConfig): 480 train /
  # 240 test scenes of 240x320 to 320x480 px, 120 train / 80 test identities.
  c.data.synthetic = dict(
      seed=0, num_train_ids=120, num_test_ids=80, num_train_scenes=480,
      num_test_scenes=240, min_persons=2, max_persons=6,
      min_train_appearances=3, max_train_appearances=5,
      min_test_appearances=2, max_test_appearances=4, num_cameras=6,
      min_person_height=40, max_person_height=160, image_scale=1.0,
      gallery_sizes=(50, 100), jpeg_quality=90)
  c.model = person_search.default_model_config("tiny")
  c.oim.num_labeled = 120
  c.oim.queue_size = 500
  c.train.batch_size = 4
  c.train.epochs = 12
  c.train.lr = 0.02
  c.train.warmup_epochs = 0.5
  c.train.lr_milestones = (9,)
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.eval.gallery_size = 50
  c.eval.batch_size = 8
  return c
