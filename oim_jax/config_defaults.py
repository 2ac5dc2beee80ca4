"""The full set of config fields, with the reference (CUHK-SYSU) defaults.

Every configs/*.py starts from `base_config()` and overrides what differs, so
a misspelled override (`--config.train.lrr=...`) fails: the dict is locked.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.parallelism = "shard_map"  # or "pmap": the same per-device step.
  c.distributed = False  # jax.distributed.initialize() (multi-host).

  # Data: see oim_jax/data/pipeline.py.
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "cuhk_sysu"  # synthetic | cuhk_sysu | prw
  c.data.root = "data/cuhk_sysu"
  c.data.min_size = 900  # shorter side after resizing
  c.data.max_size = 1500  # cap on the longer side
  c.data.max_gt = 32  # GT boxes per image, padded
  c.data.flip = True  # random horizontal flip (training)
  c.data.num_workers = 2  # decoding threads; 0 = synchronous
  c.data.skip_unlabeled_only = False  # drop train images with no labeled box
  c.data.skip_empty = False  # drop train images with no box at all
  c.data.too_many_gt = "error"  # or "truncate" images with > max_gt boxes
  c.data.prefetch_batches = 2  # bounded read-ahead of the input pipeline
  # Non-empty: read images from the array_record files that
  # `python -m oim_jax.data.prepare --data_dir=...` wrote there (annotations
  # and evaluation protocols still come from data.root).
  c.data.tfds_dir = ""
  c.data.synthetic = ml_collections.ConfigDict()  # generator sizes

  # Model (backbone, RPN, RoI heads): see oim_jax/models/person_search.py.
  from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
  c.model = person_search.default_model_config()

  # OIM: see oim_jax/oim.py.
  c.oim = ml_collections.ConfigDict()
  c.oim.loss = "oim"  # or "softmax": the paper's baseline
  c.oim.num_labeled = 5532  # LUT rows = labeled train identities
  c.oim.queue_size = 5000  # circular queue of unlabeled features
  c.oim.scalar = 30.0  # 1 / temperature (Caffe original: 10)
  c.oim.momentum = 0.5  # LUT update momentum
  c.oim.normalize = True  # re-normalise LUT rows (Caffe original: False)

  # Optimisation: see oim_jax/optim.py. The learning rate is for the global
  # batch; scale it linearly with batch_size (lr = 0.003 * batch_size / 5).
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 5  # global batch (all devices together)
  c.train.epochs = 20
  c.train.num_steps = 0  # > 0 overrides epochs
  c.train.optimizer = "sgd"  # "sgd" (momentum) | "adam"
  c.train.lr = 0.003
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.clip_norm = 10.0
  c.train.schedule_unit = "epoch"  # "epoch" or "step" (units below)
  c.train.warmup_epochs = 1.0
  c.train.warmup_steps = 0
  c.train.warmup_factor = 1e-3  # warm-up starts at lr * warmup_factor
  c.train.lr_milestones = (16,)
  c.train.lr_gamma = 0.1
  c.train.lr_decay = "step"  # "step" (milestones x lr_gamma) | "cosine"
  # > 0: also keep an exponential moving average of the model variables
  # (oim_jax/ema.py); evaluation then uses the average.
  c.train.ema_decay = 0.0
  c.train.log_every = 20
  c.train.checkpoint_every = 1000  # steps; also at the end and on SIGTERM
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True

  # Evaluation: see oim_jax/evaluation.py.
  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = True
  c.eval.every_steps = 0  # > 0: also evaluate during training (curves)
  c.eval.gallery_size = 100  # CUHK-SYSU: 50..4000, -1 = whole test set
  c.eval.det_thresh = 0.5
  c.eval.ignore_cam_id = True  # PRW: also search same-camera frames
  c.eval.batch_size = 2
  # Embed every box also in the mirrored image and average (test-time
  # augmentation; one more backbone pass per image).
  c.eval.flip_test = False
  return c
