"""Where a compiled XLA program's memory traffic goes, per instruction.

  python bench/hlo_bytes.py PROGRAM.hlo.txt [--top 30] [--by op_name|kind]

XLA's cost analysis gives one "bytes accessed" total. This reads the text of
a compiled module (`compiled.as_text()`; `bench/tpu_aot.py --hlo_dir` writes
one per compile) and charges every top-level instruction of its
non-fused computations (the entry, while bodies, calls) its operands' and
outputs' bytes, as stored: each layout's tiles (`{...:T(8,128)(2,1)}`) pad
the minor dimensions up to a whole tile, which is what a read or write of
that array moves. Arrays in device memory (HBM) and in on-chip memory spaces
(layouts ending in S(1), S(2): where XLA's memory-space assignment placed
them) are summed apart ("bytes" and "on_chip_bytes"). Instructions that
move nothing (parameter, constant, tuple, get-tuple-element, bitcast,
after-all, while, call) are not charged; a slice, dynamic-slice or
gather (also inside a fusion, of a fusion operand) reads what it outputs;
a while body counts once per trip where the trip count is a constant. A
model, not a measurement: a convolution that streams an operand several
times is charged once.

Grouped by the JAX op that wrote the instruction (`metadata.op_name`, its
name stack cut to --depth scopes) or by the instruction kind (fusion kind,
convolution, copy, ...), the top groups say which layers and which layout
changes carry the bytes.
"""

import argparse
import collections
import math
import re
import sys

DTYPE_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16,
    "f32": 32, "f64": 64, "c64": 64, "c128": 128, "f8e4m3fn": 8,
    "f8e5m2": 8, "token": 0,
}
# No traffic of their own: loop state and call arguments stay in place,
# their bodies' instructions are charged.
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
        "after-all", "partition-id", "replica-id", "while", "call",
        "conditional"}

# dtype[dims]{layout} (layout optional); dims may carry "<=" (dynamic).
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<= ]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def array_bytes(dtype: str, dims: list[int], layout: str = "") -> int:
  """Bytes of one array as stored: dims padded to the layout's first tile.

  layout: the text inside {...}, e.g. "3,2,1,0:T(8,128)(2,1)"; the
  minor_to_major list orders the dims, the first tile T(a,b,...) pads the
  most minor len(tile) dims (in that order) to multiples of the tile.
  """
  bits = DTYPE_BITS.get(dtype)
  if bits is None or not dims:
    return 0 if bits is None else math.ceil(bits / 8)
  padded = list(dims)
  if layout and ":" in layout:
    order_txt, rest = layout.split(":", 1)
    order = [int(x) for x in order_txt.split(",") if x.strip()]
    tile = re.match(r"T\(([0-9,]+)\)", rest)
    if tile and len(order) == len(dims):
      t = [int(x) for x in tile.group(1).split(",")]
      # t's last entry tiles the most minor dim, and so on outwards.
      for k, size in enumerate(reversed(t)):
        if k < len(order):
          d = order[k]
          padded[d] = -(-padded[d] // size) * size
  n = 1
  for d in padded:
    n *= d
  return math.ceil(n * bits / 8)


def memory_space(layout: str) -> int:
  """The S(n) of a layout text ("2,3,1,0:T(8,128)(2,1)S(1)" -> 1); 0 = HBM
  (device memory), n > 0 = on-chip memories (VMEM, SMEM, ...)."""
  m = re.search(r"S\((\d+)\)", layout or "")
  return int(m.group(1)) if m else 0


def shapes_bytes(text: str, hbm_only: bool = True) -> int:
  """Sum of array_bytes over every shape written in text (those in device
  memory only, unless hbm_only=False)."""
  total = 0
  for dtype, dims, layout in _SHAPE.findall(text):
    if dtype not in DTYPE_BITS:
      continue
    if hbm_only and memory_space(layout):
      continue
    d = [int(x.replace("<=", "")) for x in dims.split(",") if x.strip()]
    total += array_bytes(dtype, d, layout[1:-1] if layout else "")
  return total


def _split_call(rhs: str):
  """'f32[2]{0} fusion(f32[2]{0} %a), kind=kLoop, ...' ->
  (output text, opcode, operand text, attribute text)."""
  m = re.search(r"\s([a-z][\w\-]*)\(", rhs)
  if not m:
    return rhs, "", "", ""
  out, opcode = rhs[:m.start()], m.group(1)
  depth, i = 0, m.end() - 1
  for j in range(i, len(rhs)):
    if rhs[j] == "(":
      depth += 1
    elif rhs[j] == ")":
      depth -= 1
      if depth == 0:
        return out, opcode, rhs[i + 1:j], rhs[j + 1:]
  return out, opcode, rhs[i + 1:], ""


def _inner_computations(hlo_text: str) -> set:
  """Names of computations run inside one instruction (fusion bodies,
  reducers, comparators, scatter updates): charged through that
  instruction, not on their own."""
  inner = set()
  for m in re.finditer(r"\b(?:calls|to_apply)=%?([\w.\-]+)", hlo_text):
    line_start = hlo_text.rfind("\n", 0, m.start()) + 1
    line = hlo_text[line_start:m.start()]
    if re.search(r"\s(call|custom-call)\(", line):
      continue  # a call's body runs as top-level instructions
    inner.add(m.group(1))
  return inner


def _parse(hlo_text: str):
  """[(computation or None, name, output text, opcode, operand names,
  attribute text)] for every instruction line of the module."""
  rows, comp = [], None
  for line in hlo_text.splitlines():
    if line.strip() == "}":
      comp = None
      continue
    # Computation headers start in column 0; instructions are indented.
    m = _COMP.match(line) if not line[:1].isspace() else None
    if m:
      comp = m.group(2)
      continue
    im = _INSTR.match(line)
    if not im or comp is None:
      continue
    name, rhs = im.groups()
    out, opcode, operands, attrs = _split_call(rhs)
    if opcode:
      rows.append((comp, name, out, opcode,
                   re.findall(r"%([\w.\-]+)", operands), attrs))
  return rows


def _trip_count(hlo_text: str, condition: str):
  """N when a while condition is `counter < constant(N)` (a scan or
  fori_loop), else None (a data-dependent loop)."""
  m = re.search(r"\n%?" + re.escape(condition) + r" [^\n]*\{\n(.*?)\n\}",
                hlo_text, re.S)
  if not m:
    return None
  body = m.group(1)
  root = re.search(r"ROOT [^\n]*compare\([^)]*%([\w.\-]+)\),"
                   r" direction=LT", body)
  if not root:
    return None
  const = re.search(r"%" + re.escape(root.group(1))
                    + r" = s32\[\][^ ]* constant\((\d+)\)", body)
  return int(const.group(1)) if const else None


def loop_multipliers(hlo_text: str, rows=None):
  """{computation: how many times one run of the module runs it} for the
  entry (1) and while bodies/conditions (the enclosing count times the
  loop's trips; a data-dependent loop counts once) and call bodies.
  Also returns the set of computations under a data-dependent loop."""
  rows = rows if rows is not None else _parse(hlo_text)
  entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo_text, re.M)
  mult = {entry.group(1): 1} if entry else {}
  unknown = set()
  for _ in range(8):  # nesting depth; a fixed point comes much sooner
    changed = False
    for comp, _, _, opcode, _, attrs in rows:
      if comp not in mult or opcode not in ("while", "call"):
        continue
      if opcode == "call":
        targets = re.findall(r"to_apply=%?([\w.\-]+)", attrs)
        trips = 1
      else:
        cond = re.search(r"condition=%?([\w.\-]+)", attrs).group(1)
        body = re.search(r"body=%?([\w.\-]+)", attrs).group(1)
        targets = [cond, body]
        trips = _trip_count(hlo_text, cond)
        if trips is None:
          unknown.update(targets)
          trips = 1
      for t in targets:
        if comp in unknown:
          unknown.add(t)
        if mult.get(t) != mult[comp] * trips:
          mult[t] = mult[comp] * trips
          changed = True
    if not changed:
      break
  return mult, unknown


_PARTIAL_READS = ("slice", "dynamic-slice", "gather")


def _partial_operand_reads(hlo_text: str, rows):
  """{(fused computation, operand index): bytes} for fusion operands that
  the fused body only slices (slice, dynamic-slice, gather): such a fusion
  reads those slices, not the whole operand (e.g. one chunk per loop trip)."""
  index = {}
  for m in re.finditer(r"\n\s*%?([\w.\-]+) = [^\n]* parameter\((\d+)\)",
                       hlo_text):
    index[m.group(1)] = int(m.group(2))
  users = {}
  out_bytes = {}
  for comp, name, out, opcode, operands, _ in rows:
    out_bytes[(comp, name)] = shapes_bytes(out, hbm_only=False)
    for o in operands:
      users.setdefault((comp, o), []).append((opcode, name))
  partial = {}
  for comp, name, _, opcode, _, _ in rows:
    if opcode != "parameter" or name not in index:
      continue
    us = users.get((comp, name), [])
    if us and all(op in _PARTIAL_READS for op, _ in us):
      partial[(comp, index[name])] = sum(out_bytes[(comp, u)] for _, u in us)
  return partial


def instructions(hlo_text: str):
  """Yields dicts (name, opcode, kind, op_name, bytes, on_chip_bytes,
  computation) for the top-level instructions of every computation that is
  not run inside one instruction (the entry, while bodies and conditions,
  call bodies).

  bytes: device-memory (HBM) bytes read and written = the HBM arrays among
  its outputs and operands (module-wide unique instruction names; the
  printed operand list need not repeat shapes). An asynchronous copy or
  slice is charged at its *-start (source read, destination write if in
  HBM), its *-done nothing. on_chip_bytes: the same for arrays in on-chip
  memory spaces (S(1), ...). An instruction without metadata (XLA's own
  copies and prefetches) takes its first operand's op_name. Inside a
  while loop both are multiplied by its trip count where that is a
  constant (`trips`; `data_dependent_loop`: under a loop whose count is
  known only at run time, charged once).
  """
  inner = _inner_computations(hlo_text)
  rows = _parse(hlo_text)
  mult, unknown = loop_multipliers(hlo_text, rows)
  partial = _partial_operand_reads(hlo_text, rows)
  size = {name: (shapes_bytes(out), shapes_bytes(out, False))
          for _, name, out, _, _, _ in rows}
  origin = {}
  for comp, name, out, opcode, operands, attrs in rows:
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    origin[name] = (op_name.group(1) if op_name else
                    next((origin[o] for o in operands if origin.get(o)), ""))
    if comp in inner or opcode in FREE:
      continue
    kind = re.search(r"kind=(k\w+)", attrs)
    called = re.search(r"calls=%?([\w.\-]+)", attrs)
    ins = [size.get(o, (0, 0)) for o in operands]
    if opcode in _PARTIAL_READS:  # reads what it outputs
      ins = [size[name]] + [(0, 0)] * (len(ins) - 1)
    elif opcode == "fusion" and called:
      for k, o in enumerate(operands):
        part = partial.get((called.group(1), k))
        if part is not None and size.get(o, (0, 0))[1]:
          # The slice's share of the operand, in the operand's memory.
          hbm_o, all_o = size[o]
          ins[k] = (min(part, hbm_o) if hbm_o else 0, min(part, all_o))
    hbm_in = sum(i[0] for i in ins)
    all_in = sum(i[1] for i in ins)
    hbm_out, all_out = size[name]
    if opcode.endswith("-done"):
      hbm = all_ = 0
    elif opcode.endswith("-start"):
      # The start's tuple repeats its source: count the source once.
      hbm, all_ = hbm_out, all_out
    else:
      hbm, all_ = hbm_in + hbm_out, all_in + all_out
    trips = mult.get(comp, 1)
    yield {
        "name": name, "opcode": opcode, "computation": comp,
        "kind": opcode + (":" + kind.group(1) if kind else ""),
        "op_name": origin[name], "bytes": hbm * trips,
        "on_chip_bytes": (all_ - hbm) * trips, "trips": trips,
        "data_dependent_loop": comp in unknown,
    }


def scope(op_name: str, depth: int) -> str:
  """'jit(fn)/jvp(ResNetStem)/layer3_0/conv1/conv_general_dilated' cut to
  its first `depth` scopes after the jit, with transpose()/jvp() kept as
  a prefix (they mark the backward / forward pass)."""
  parts = [p for p in op_name.split("/") if p]
  if parts and parts[0].startswith("jit("):
    parts = parts[1:]
  mode = ""
  clean = []
  for p in parts:
    while m := re.match(r"^(transpose|jvp|vmap|remat|checkpoint)\((.*)\)$",
                        p):
      mode = mode or ("backward" if m.group(1) == "transpose" else "")
      p = m.group(2)
    clean.append(p)
  return (mode + " " if mode else "") + "/".join(clean[:depth])


def group(instrs, by: str = "op_name", depth: int = 3):
  """{group: [bytes, count]} sorted by bytes, descending."""
  acc = collections.defaultdict(lambda: [0, 0])
  for ins in instrs:
    key = scope(ins["op_name"], depth) if by == "op_name" else ins[by]
    acc[key][0] += ins["bytes"]
    acc[key][1] += 1
  return dict(sorted(acc.items(), key=lambda kv: -kv[1][0]))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("hlo")
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--by", default="op_name", choices=("op_name", "kind"))
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--batch", type=int, default=1,
                 help="divide bytes by this (per-image figures)")
  args = p.parse_args(argv)
  with open(args.hlo) as f:
    instrs = list(instructions(f.read()))
  total = sum(i["bytes"] for i in instrs)
  gib = 2 ** 30 * args.batch
  print(f"{len(instrs)} instructions, {total / gib:.3f} GiB"
        + (" per image" if args.batch > 1 else ""))
  print(f"| {args.by} | GiB | share | instructions |\n|---|---|---|---|")
  for key, (b, n) in list(group(instrs, args.by, args.depth).items())[
      :args.top]:
    print(f"| {key or '-'} | {b / gib:.3f} | {100 * b / total:.1f} % | {n} |")


if __name__ == "__main__":
  sys.exit(main())
