"""The config schema (oim_jax/config_defaults.py): fields, validate, hints."""

import ast
import glob
import importlib.util
import os
import re

import ml_collections
import pytest

from oim_jax import config_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = [("cuhk.py", ""), ("cuhk_paper.py", ""), ("prw.py", ""),
           ("synthetic.py", ""), ("synthetic.py", "fast"),
           ("synthetic.py", "long")]


def _load(name, variant=""):
  spec = importlib.util.spec_from_file_location(
      name[:-3], os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _flat_fields(config, prefix=""):
  out = set()
  for key, value in config.items():
    path = f"{prefix}{key}"
    out.add(path)
    if isinstance(value, ml_collections.ConfigDict):
      out |= _flat_fields(value, path + ".")
  return out


FIELDS = _flat_fields(config_defaults.base_config())


@pytest.mark.parametrize("name,variant", SHIPPED)
def test_shipped_configs_validate(name, variant):
  config = _load(name, variant)
  config_defaults.validate(config, num_devices=1)
  # Only overrides of schema fields (a locked dict cannot gain any).
  assert _flat_fields(config) <= FIELDS | {
      f"data.synthetic.{k}" for k in config.data.synthetic}


def test_every_rule_names_a_schema_field():
  assert set(config_defaults.CHOICES) <= FIELDS
  assert set(config_defaults._RULES) <= FIELDS  # pylint: disable=protected-access
  # The defaults themselves pass.
  config_defaults.validate(config_defaults.base_config())


@pytest.mark.parametrize("field", sorted(config_defaults.CHOICES))
def test_a_value_outside_the_choices_names_field_and_choices(field):
  config = config_defaults.base_config()
  bad = "nope" if isinstance(config_defaults.CHOICES[field][0], str) else 7
  config.unlock()
  config.update_from_flattened_dict({field: bad})
  with pytest.raises(ValueError) as e:
    config_defaults.validate(config)
  message = str(e.value)
  assert f"config.{field}={bad!r}" in message
  for allowed in config_defaults.CHOICES[field]:
    assert repr(allowed) in message


@pytest.mark.parametrize("field,bad", [
    ("data.min_size", 0), ("data.max_gt", -3), ("data.num_workers", -1),
    ("data.prefetch_batches", 0), ("model.head_blocks", -1),
    ("model.wgrad_im2col_min_channels", -2), ("model.roi.fg_fraction", 1.5),
    ("model.rpn.fg_fraction", 0.0), ("oim.num_labeled", 0),
    ("oim.momentum", 2.0), ("train.batch_size", 0), ("train.lr", 0.0),
    ("train.ema_decay", 1.0), ("train.num_steps", -5),
    ("eval.gallery_size", 0), ("eval.gallery_size", -2),
    ("eval.det_thresh", 1.5), ("eval.every_steps", -1)])
def test_a_bad_number_names_the_field_and_what_it_accepts(field, bad):
  config = config_defaults.base_config()
  config.update_from_flattened_dict({field: bad})
  with pytest.raises(ValueError, match=re.escape(f"config.{field}=")) as e:
    config_defaults.validate(config)
  assert ": use " in str(e.value)


def test_all_bad_fields_are_reported_at_once():
  config = config_defaults.base_config()
  config.train.optimizer = "lamb"
  config.eval.batch_size = 0
  config.model.stride = 4
  with pytest.raises(ValueError) as e:
    config_defaults.validate(config)
  for field in ("train.optimizer", "eval.batch_size", "model.stride"):
    assert f"config.{field}=" in str(e.value)


def test_cross_field_rules():
  config = config_defaults.base_config()
  config.data.max_size = 800  # below min_size 900
  with pytest.raises(ValueError, match="config.data.max_size=800"):
    config_defaults.validate(config)
  config = config_defaults.base_config()
  config.model.rpn.stride = 32
  with pytest.raises(ValueError, match="config.model.rpn.stride=32"):
    config_defaults.validate(config)
  config.model.stride, config.model.rpn.stride = 8, 16  # the synthetic layout
  config_defaults.validate(config)


def test_batch_must_split_over_the_devices():
  config = config_defaults.base_config()  # batch 5
  config_defaults.validate(config, num_devices=5)
  with pytest.raises(ValueError, match=r"batch_size=5 must be a multiple "
                     r"of the number of devices \(4\)"):
    config_defaults.validate(config, num_devices=4)


def test_an_old_config_json_without_newer_fields_passes():
  # config.json of a run from before a field existed: skipped, not an error.
  old = config_defaults.base_config().to_dict()
  del old["model"]["head_blocks"], old["data"]["prefetch_batches"]
  config_defaults.validate(ml_collections.ConfigDict(old))


def test_model_presets():
  tiny = config_defaults.model_config("tiny")
  assert (tiny.depth, tiny.width, tiny.embedding_dim) == (18, 8, 64)
  assert config_defaults.model_config() == config_defaults.base_config().model
  with pytest.raises(ValueError, match="'resnet50' or 'tiny'"):
    config_defaults.model_config("resnet9000")


# `config.a.b` / `--config.a.b` as the code's messages and the docs name them.
_FIELD_REF = re.compile(r"(?<![\w.])(?:--)?config\.((?:[a-z_0-9]+\.)*[a-z_0-9]+)")
# What may follow a field path without being part of it.
_METHODS = {"get", "items", "keys", "to_dict", "unlock", "lock", "update",
            "json", "py"}


def _refs(text):
  for m in _FIELD_REF.finditer(text):
    parts = m.group(1).split(".")
    while parts and parts[-1] in _METHODS:
      parts.pop()
    if parts:
      yield ".".join(parts)


def _message_strings(path):
  """String constants of a module that are not docstrings."""
  tree = ast.parse(open(path).read())
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef,
                         ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(
          body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings):
      yield node.value


def _known(field):
  if field in FIELDS:
    return True
  # data.synthetic holds the generator's sizes (a free-form dict).
  return field.startswith("data.synthetic.")


def test_every_field_the_messages_name_exists():
  sources = (glob.glob(os.path.join(ROOT, "oim_jax", "**", "*.py"),
                       recursive=True)
             + [os.path.join(ROOT, n) for n in ("train.py", "eval.py",
                                                "search.py")])
  bad = []
  for path in sources:
    for text in _message_strings(path):
      bad += [(os.path.relpath(path, ROOT), f) for f in _refs(text)
              if not _known(f)]
  assert not bad, bad


def test_every_field_the_docs_name_exists():
  docs = [os.path.join(ROOT, "README.md")] + glob.glob(
      os.path.join(ROOT, "docs", "*.md"))
  bad = []
  for path in docs:
    text = open(path).read()
    bad += [(os.path.basename(path), f) for f in _refs(text) if not _known(f)]
    # Table cells name fields as `model.x` without the "config." prefix.
    for cell in re.findall(r"`((?:data|model|oim|train|eval)\.[a-z_0-9.]+)`",
                           text):
      if not cell.endswith((".py", ".md", ".json")) and not _known(cell):
        bad.append((os.path.basename(path), cell))
  assert not bad, bad
