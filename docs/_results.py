"""Benchmark results (``bench/results/*.json``) rendered as Markdown tables.

Used by ``conf.py`` at build time, so the documentation always shows the figures
stored in the repository. Lists of flat records become tables; nested dicts of
scalars become two-column (figure, value) tables; per-step curves are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Long per-step series and raw sweeps stay in the JSON files.
SKIP_KEYS = {"curve", "curves", "sweep", "runs", "loadavg_start", "loadavg_end"}
MAX_ROWS = 40


def _fmt(v: Any) -> str:
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    if v == 0 or 1e-3 <= abs(v) < 1e5:
      return f"{v:.4g}"
    return f"{v:.3e}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_fmt(x) for x in v) + "]" if len(v) <= 8 else f"{len(v)} values"
  if v is None:
    return "-"
  return str(v).replace("|", "\\|")


def _is_scalar(v: Any) -> bool:
  return v is None or isinstance(v, (bool, int, float, str)) or (
      isinstance(v, (list, tuple)) and all(_is_scalar(x) and not isinstance(x, list) for x in v))


def _records_table(rows: list[dict]) -> list[str]:
  cols: list[str] = []
  for r in rows:
    cols += [k for k, v in r.items() if k not in cols and k not in SKIP_KEYS and _is_scalar(v)]
  out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows[:MAX_ROWS]:
    out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
  if len(rows) > MAX_ROWS:
    out.append(f"\n({len(rows) - MAX_ROWS} more rows in the JSON file.)")
  return out


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
  items = []
  for k, v in d.items():
    if k in SKIP_KEYS:
      continue
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      items += _flatten(v, key + " / ")
    elif _is_scalar(v):
      items.append((key, v))
  return items


def _section(name: str, value: Any, level: int) -> list[str]:
  head = "#" * level + f" {name}"
  if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
    return [head, "", *_records_table(value), ""]
  if isinstance(value, dict):
    lists = {k: v for k, v in value.items() if k not in SKIP_KEYS and isinstance(v, list)
             and v and all(isinstance(r, dict) for r in v)}
    nested = {k: v for k, v in value.items() if isinstance(v, dict) and k not in SKIP_KEYS
              and any(isinstance(x, list) and x and isinstance(x[0], dict) for x in v.values())}
    scalars = _flatten({k: v for k, v in value.items() if k not in lists and k not in nested})
    out = [head, ""]
    if scalars:
      out += ["| figure | value |", "|---|---|"]
      out += [f"| {k} | {_fmt(v)} |" for k, v in scalars] + [""]
    for k, v in lists.items():
      out += _section(f"{name}: {k}", v, min(level + 1, 6))
    for k, v in nested.items():
      out += _section(f"{name}: {k}", v, min(level + 1, 6))
    return out
  return []


LM_COLUMNS = [("method", "method"), ("val_loss", "val loss"),
              ("final_train_loss", "train loss"), ("time_vs_adamw", "step time / AdamW"),
              ("state_mb", "optimizer state (MB)"), ("note", "setting")]


def ablation_table(results: Path) -> list[str]:
  """The demo ablation: one row per method, sorted by validation loss."""
  path = results / "ablation.json"
  if not path.exists():
    return ["(no `bench/results/ablation.json` yet: run `make demo`.)", ""]
  data = json.loads(path.read_text())
  rows = sorted(data.get("lm", []), key=lambda r: r.get("val_loss", float("inf")))
  cfg = data.get("config", {})
  out = [f"Byte-level LM, d_model {cfg.get('d_model')}, {cfg.get('layers')} layers, "
         f"sequence {cfg.get('seq_len')}, batch {cfg.get('batch_size')}, "
         f"{cfg.get('steps')} steps, seed {cfg.get('seed')}, low-rank rank {cfg.get('rank')}; "
         f"measured {data.get('meta', {}).get('time', '?')} on "
         f"{data.get('meta', {}).get('device', '?')}.", "",
         "| " + " | ".join(h for _, h in LM_COLUMNS) + " |", "|" + "---|" * len(LM_COLUMNS)]
  for r in rows:
    out.append("| " + " | ".join(_fmt(r.get(k, "")) for k, _ in LM_COLUMNS) + " |")
  return out + [""]


def _producer(results: Path, stem: str) -> str:
  for name in (f"bench_{stem}.py", f"{stem}.py"):
    if (results.parent / name).exists():
      return f"Produced by `bench/{name}`."
  return ""


def write_tables(results: Path, target: Path) -> None:
  """Writes every results file as a Markdown section to ``target``."""
  out = ["<!-- generated from bench/results/*.json by docs/_results.py; do not edit -->", ""]
  for path in sorted(results.glob("*.json")):
    data = json.loads(path.read_text())
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    out += [f"## `{path.name}`", "",
            f"Measured {meta.get('time', '?')} on {meta.get('device', '?')} "
            f"({meta.get('num_devices', '?')} device(s)), jax {meta.get('jax', '?')}. "
            + _producer(results, path.stem), ""]
    body = {k: v for k, v in data.items() if k != "meta"} if isinstance(data, dict) else data
    for key, value in (body.items() if isinstance(body, dict) else [("rows", body)]):
      if _is_scalar(value):
        out += [f"- {key}: {_fmt(value)}"]
      else:
        out += _section(f"{path.stem}: {key}", value, 3)
    out.append("")
  text = "\n".join(out)
  if not target.exists() or target.read_text() != text:
    target.write_text(text)
