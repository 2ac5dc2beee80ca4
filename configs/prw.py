"""PRW with the CUHK-SYSU recipe.

The LUT holds all 483 labeled train identities: PRW ids 1-478, 480-483 and
932, mapped to rows 0..482 in increasing id order (932 -> 482); unlabeled
persons (id -2 in the annotations) fill the 500-slot queue. The commonly
reported number searches all test frames (ignore_cam_id=True); set it False
for cross-camera-only search. Paper: mAP 21.3 / top-1 49.9.
"""

from oim_jax import config_defaults


def get_config():
  c = config_defaults.base_config()
  c.data.dataset = "prw"
  c.data.root = "data/prw"
  c.model.pretrained = "weights/resnet50_imagenet.npz"
  c.oim.num_labeled = 483
  c.oim.queue_size = 500
  c.eval.gallery_size = -1
  return c
