"""Reading MATLAB struct/cell arrays as scipy.io.loadmat returns them.

`scipy.io.loadmat` (default options) turns a MATLAB struct array into a numpy
structured array of shape (rows, cols) whose fields are object arrays; a cell
array into an object array; a char row into a (1,) unicode array; a scalar into
a (1, 1) array. Values are therefore wrapped in layers of size-1 arrays, e.g.
`Img[0, k]["imname"]` is `array(['s1.jpg'])` and a cell holding a 1x1 struct is
`array([[array([[(...)]], dtype=[...])]], dtype=object)`. The helpers here peel
those layers off so loaders can address fields by name, and turn I/O problems
into errors that name the file and say what to do.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import scipy.io


class DatasetNotFoundError(FileNotFoundError):
  """A dataset root or one of its files is missing."""


class DatasetFormatError(ValueError):
  """A dataset file exists but cannot be read or has an unexpected layout."""


def require_path(path: str, what: str, how_to_get: str, is_dir=False) -> str:
  """Returns `path` if it exists, else raises DatasetNotFoundError.

  Args:
    path: the file or directory expected.
    what: a short description ("CUHK-SYSU annotation file").
    how_to_get: the download instructions appended to the message.
    is_dir: whether `path` must be a directory.
  """
  ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
  if not ok:
    kind = "directory" if is_dir else "file"
    raise DatasetNotFoundError(
        f"{what}: {kind} not found: {path}\n{how_to_get}")
  return path


def load_mat(path: str, what: str, how_to_get: str) -> dict[str, Any]:
  """scipy.io.loadmat with clear errors.

  Raises:
    DatasetNotFoundError: the file does not exist.
    DatasetFormatError: the file exists but is not a readable MATLAB v4-v7.2
      file (corrupt, truncated, or v7.3/HDF5, which scipy cannot read).
  """
  require_path(path, what, how_to_get)
  try:
    return scipy.io.loadmat(path)
  except NotImplementedError as e:  # scipy raises this for v7.3 (HDF5) files.
    raise DatasetFormatError(
        f"{path}: MATLAB v7.3 (HDF5) files are not supported ({e}); re-save it "
        "with MATLAB `save(..., '-v7')` or use the original dataset file."
    ) from e
  except Exception as e:  # MatReadError, ValueError, OSError, zlib errors...
    raise DatasetFormatError(
        f"{path}: cannot read this .mat file ({type(e).__name__}: {e}). The "
        f"file is corrupt or incomplete; download it again.\n{how_to_get}"
    ) from e


def get_var(mat: dict[str, Any], path: str, names: Sequence[str]) -> Any:
  """The first of `names` present in a loadmat dict, else DatasetFormatError."""
  for name in names:
    if name in mat:
      return mat[name]
  present = sorted(k for k in mat if not k.startswith("__"))
  raise DatasetFormatError(
      f"{path}: none of the variables {list(names)} found (present: {present}).")


def unwrap(x: Any) -> Any:
  """Peels size-1 object arrays: array([[obj]], dtype=object) -> obj."""
  while isinstance(x, np.ndarray) and x.dtype == object and x.size == 1:
    x = x.reshape(())[()]
  return x


def to_str(x: Any) -> str:
  """A MATLAB char array / cell holding one string -> str."""
  if type(x) is np.ndarray and x.dtype.kind == "U" and x.size == 1:
    return x.item().strip()  # Fast path: loadmat's (1,) char row.
  x = unwrap(x)
  if isinstance(x, np.ndarray):
    if x.size != 1:
      raise ValueError(f"expected one string, got an array of shape {x.shape}")
    x = x.reshape(())[()]
  if isinstance(x, bytes):
    x = x.decode("utf-8")
  if not isinstance(x, str):
    raise ValueError(f"expected a string, got {type(x).__name__}")
  return str(x).strip()


def to_floats(x: Any) -> np.ndarray:
  """A MATLAB numeric array (any wrapping) -> flat float64 array (maybe empty)."""
  if type(x) is np.ndarray and x.dtype.kind == "f":
    return x.reshape(-1).astype(np.float64, copy=False)  # Fast path.
  x = unwrap(x)
  return np.asarray(x, dtype=np.float64).reshape(-1)


def records(x: Any) -> list:
  """Flattens a struct array, a cell array of structs, or one record.

  Returns the struct elements (numpy records, addressable by field name) in
  MATLAB linear order (column-major, which equals row order for the 1xN and
  Nx1 arrays used by the datasets).
  """
  if isinstance(x, np.void):
    return [x]
  if not isinstance(x, np.ndarray):
    raise ValueError(f"expected a struct or cell array, got {type(x).__name__}")
  out = []
  flat = x.reshape(-1, order="F")
  if x.dtype.names is not None:
    return list(flat)
  if x.dtype == object:  # A cell array: recurse into each cell.
    for cell in flat:
      out.extend(records(cell))
    return out
  if x.size == 0:
    return []
  raise ValueError(f"expected a struct or cell array, got dtype {x.dtype}")


def field(record: Any, name: str) -> Any:
  """Field `name` of one struct element, with a clear error when absent."""
  names = record.dtype.names if hasattr(record, "dtype") else None
  if not names or name not in names:
    raise KeyError(f"struct has no field {name!r} (fields: {names})")
  return record[name]


def strings(x: Any) -> list[str]:
  """A cell array (or char matrix) of strings -> list of str, linear order."""
  if isinstance(x, np.ndarray) and x.dtype.kind == "U":
    return [str(s).strip() for s in x.reshape(-1, order="F")]
  if isinstance(x, np.ndarray) and x.dtype == object:
    return [to_str(c) for c in x.reshape(-1, order="F")]
  return [to_str(x)]


def format_error(path: str, e: Exception,
                 expected: str) -> DatasetFormatError:
  """DatasetFormatError for a file whose structure is not the expected one."""
  return DatasetFormatError(
      f"{path}: unexpected structure ({type(e).__name__}: {e}); expected "
      f"{expected}.")


def check_image_sample(paths: Sequence[str], num: int, what: str,
                       logger) -> int:
  """Checks that `num` evenly spaced paths exist; logs and returns the misses.

  Images are not opened at load time; this only catches a wrong root or a
  partial copy early. num <= 0 disables the check.
  """
  if num <= 0 or not paths:
    return 0
  idx = np.unique(np.linspace(0, len(paths) - 1, min(num, len(paths)))
                  .astype(np.int64))
  missing = [paths[i] for i in idx if not os.path.isfile(paths[i])]
  if missing:
    logger.warning("%s: %d of %d sampled image files are missing, e.g. %s",
                   what, len(missing), len(idx), missing[0])
  return len(missing)
