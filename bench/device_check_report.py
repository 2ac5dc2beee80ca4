"""Markdown summary of one bench/device_check.sh result file.

  python bench/device_check_report.py bench/results/device_check/<file>.jsonl

Prints the environment line and one table row per check, with the targets
the check reports against (one H100-class GPU, bfloat16: >= 150 train and
>= 200 inference images/s).
"""

import json
import sys

TARGETS = {"train/bfloat16": 150.0, "infer/bfloat16": 200.0}


def _fmt(value, spec=".2f"):
  if value is None:
    return "-"
  return format(value, spec) if isinstance(value, float) else str(value)


def rows_to_markdown(rows: list[dict]) -> str:
  """The report of a result file's rows (dicts with a "check" key)."""
  lines = []
  for r in rows:
    if r["check"] == "environment":
      lines.append(f"jax {r['jax']} / jaxlib {r['jaxlib']}, backend "
                   f"{r['backend']}, {r['device_count']} x {r['device_kind']}")
  lines += ["", "| check | images/s | target | step or call s | compile s "
            "| device peak GiB | compiles | notes |",
            "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    name = r["check"]
    if name == "environment":
      continue
    if r.get("failed"):
      lines.append(f"| {name} | failed (rc {r['rc']}) | | | | | | |")
      continue
    target = TARGETS.get(name)
    if name.startswith("train/"):
      ips, secs = r["images_per_s"], r["step_s"]
      compile_s, compiles = r["compile_s"], (
          f"{r['backend_compiles_step']} + {r['backend_compiles_timed']} timed")
      notes = f"batch {r['batch']}, {r['height']}x{r['width']}"
    elif name.startswith("infer/"):
      ips, secs = r["images_per_s"], r["detect_s"]
      compile_s = r["detect_compile_s"]
      compiles = str(r["backend_compiles_total"])
      notes = f"detect, batch {r['batch']}"
    else:  # the train.py run
      ips, secs, compile_s = (r.get("images_per_sec"), r.get("sec_per_step"),
                              None)
      compiles = _fmt(r.get("step_compilations"))
      notes = (f"rc {r['rc']}, loss {_fmt(r.get('first_loss'), '.3f')} -> "
               f"{_fmt(r.get('last_loss'), '.3f')}"
               + (" (down)" if r.get("loss_went_down") else " (NOT down)"))
    verdict = ""
    if target is not None and ips is not None:
      verdict = f"{target:.0f} ({'met' if ips >= target else 'not met'})"
    lines.append(f"| {name} | {_fmt(ips, '.1f')} | {verdict} | "
                 f"{_fmt(secs, '.3f')} | {_fmt(compile_s, '.1f')} | "
                 f"{_fmt(r.get('device_peak_gib'))} | {compiles} | {notes} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    sys.exit(__doc__)
  with open(argv[1]) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  print(rows_to_markdown(rows))


if __name__ == "__main__":
  main(sys.argv)
