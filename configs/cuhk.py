"""CUHK-SYSU, the modern PyTorch-reimplementation recipe (ResNet-50, OIM).

ImageNet-initialised ResNet-50 C4, images 900/1500, batch 5, SGD 0.9 at
lr 0.003 (warm-up over the first epoch from lr/1000, x0.1 at epoch 16 of 20),
weight decay 5e-4, clip 10, OIM scalar 30, LUT 5532, queue 5000, momentum 0.5.
Reported by such reimplementations: mAP ~88 / top-1 ~89 (gallery 100).

  python train.py --config=configs/cuhk.py --workdir=runs/cuhk \
      --config.data.root=/path/to/cuhk_sysu \
      --config.model.pretrained=weights/resnet50_imagenet.npz
"""

from oim_jax import config_defaults


def get_config():
  c = config_defaults.base_config()
  c.data.dataset = "cuhk_sysu"
  c.data.root = "data/cuhk_sysu"
  c.model.pretrained = "weights/resnet50_imagenet.npz"
  c.oim.num_labeled = 5532
  c.oim.queue_size = 5000
  return c
