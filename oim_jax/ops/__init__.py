"""Detection ops in pure jax.numpy (no Flax).

Boxes are (x1, y1, x2, y2) float32 pixels, no +1 (width = x2 - x1).
"""

from oim_jax.ops.anchors import anchors
from oim_jax.ops.anchors import base_anchors
from oim_jax.ops.anchors import num_anchors
from oim_jax.ops.boxes import BBOX_XFORM_CLIP
from oim_jax.ops.boxes import box_area
from oim_jax.ops.boxes import box_iou
from oim_jax.ops.boxes import clip_boxes
from oim_jax.ops.boxes import decode_boxes
from oim_jax.ops.boxes import encode_boxes
from oim_jax.ops.boxes import ROI_HEAD_WEIGHTS
from oim_jax.ops.boxes import RPN_WEIGHTS
from oim_jax.ops.boxes import small_box_mask
from oim_jax.ops.conv import conv3x3
from oim_jax.ops.conv import conv3x3_im2col_wgrad
from oim_jax.ops.flip import flip_boxes
from oim_jax.ops.flip import flip_images
from oim_jax.ops.nms import batched_nms
from oim_jax.ops.nms import nms
from oim_jax.ops.normalize import normalize
from oim_jax.ops.roi_align import roi_align
from oim_jax.ops.roi_align import roi_align_per_image
