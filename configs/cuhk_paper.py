"""CUHK-SYSU, the paper's Caffe recipe (Xiao et al. 2017).

Images 600/1000, 2 images per update, lr 0.001 with a x0.1 step at 40k of
50k iterations, OIM scalar 10, no LUT re-normalisation, RoI fg fraction 0.25,
anchors 128/256/512. Paper: mAP 75.5 / top-1 78.7 (gallery 100).
"""

from oim_jax import config_defaults


def get_config():
  c = config_defaults.base_config()
  c.data.dataset = "cuhk_sysu"
  c.data.root = "data/cuhk_sysu"
  c.data.min_size = 600
  c.data.max_size = 1000
  c.model.pretrained = "weights/resnet50_imagenet.npz"
  c.model.anchor_sizes = (128, 256, 512)
  c.model.roi.fg_fraction = 0.25
  c.oim.num_labeled = 5532
  c.oim.queue_size = 5000
  c.oim.scalar = 10.0
  c.oim.normalize = False
  c.train.batch_size = 2
  c.train.lr = 0.001
  c.train.schedule_unit = "step"
  c.train.num_steps = 50000
  c.train.warmup_steps = 0
  c.train.lr_milestones = (40000,)
  return c
