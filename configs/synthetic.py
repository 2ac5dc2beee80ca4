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
