"""Figures of merit of a compiled SPMD program: collectives, flops, bytes, memory.

:func:`collectives` reads ``compiled.as_text()`` (the per-device program after
SPMD partitioning) and counts every collective by kind with its bytes per
device: all-gather by its output shape, all-reduce / all-to-all /
collective-permute by their operand (= output) shape, reduce-scatter by its
operand (output times the group size). A collective inside a ``while`` body is
counted once per iteration (XLA's ``known_trip_count``; a loop without one
counts once and is reported in ``unknown_trip_loops``). The branches of a
``conditional`` (``lax.cond`` / ``lax.switch``) are alternatives: one runs per
execution, so a conditional counts as its branch with the most collective bytes
(the costliest single execution, e.g. the refresh step of a projector refreshed
every ``T`` steps); ``bytes_all_branches`` adds every branch instead (an upper
bound that no execution reaches).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax

KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(
    r"=\s*(\(.*?\)|[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:calls|to_apply)=\{?([%\w.\-, ]+)\}?")
_BRANCHES = re.compile(
    r"(?:branch_computations=\{([%\w.\-, ]+)\}|true_computation=%?([\w.\-]+),"
    r" false_computation=%?([\w.\-]+))")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")


def _shape_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _SHAPE.findall(text):
    if dtype in _DTYPE_BYTES:
      out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return out


def _group_size(line: str) -> int:
  m = _GROUPS_IOTA.search(line)
  if m:
    return int(m.group(2))
  m = _GROUPS_LIST.search(line)
  return len(m.group(1).split(",")) if m else 1


def _parse(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
  comps: dict[str, dict[str, Any]] = {}
  entry, current = None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("{")[0].split("(")[0]:
      current = {"collectives": [], "calls": [], "branches": []}
      comps[m.group(1)] = current
      if line.startswith("ENTRY"):
        entry = m.group(1)
      continue
    if current is None:
      continue
    m = _INSTRUCTION.search(line)
    if m:
      kind, sizes = m.group(2), _shape_bytes(m.group(1))
      if m.group(3) and kind == "all-gather":  # start op: (operand, output)
        sizes = sizes[-1:]
      elif m.group(3):
        sizes = sizes[: max(1, len(sizes) // 2)] if m.group(1).startswith("(") else sizes
      nbytes = sum(sizes)
      if kind == "reduce-scatter":
        nbytes *= _group_size(line)
      current["collectives"].append((kind, nbytes))
    w = _WHILE.search(line)
    if w:
      trip = _TRIP.search(line)
      current["calls"].append((w.group(2), int(trip.group(1)) if trip else None))
      current["calls"].append((w.group(1), 0))  # conditions hold no collectives
      continue
    b = _BRANCHES.search(line)
    if b:
      names = b.group(1).split(",") if b.group(1) else [b.group(2), b.group(3)]
      current["branches"].append([n.strip().lstrip("%") for n in names if n.strip()])
      continue
    for names in _CALLS.findall(line):
      for name in names.split(","):
        if name.strip():
          current["calls"].append((name.strip().lstrip("%"), 1))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return entry, comps


def collectives(text: str) -> dict[str, Any]:
  """Collectives of a compiled module's text, counted with their loop trip counts, a
  conditional as its costliest branch (module docstring).

  Returns ``{"by_kind": {kind: {"count", "bytes"}}, "count", "bytes",
  "bytes_all_branches", "unknown_trip_loops"}`` with bytes per device.
  """
  entry, comps = _parse(text)
  unknown = 0

  def visit(name: str, depth: int, worst: bool) -> dict[str, list[int]]:
    """Per kind ``[count, bytes]`` of one execution of computation ``name``."""
    nonlocal unknown
    tally = {k: [0, 0] for k in KINDS}
    comp = comps.get(name)
    if comp is None or depth > 50:
      return tally

    def add(other, mult):
      for k in KINDS:
        tally[k][0] += mult * other[k][0]
        tally[k][1] += mult * other[k][1]

    for kind, nbytes in comp["collectives"]:
      tally[kind][0] += 1
      tally[kind][1] += nbytes
    for callee, trip in comp["calls"]:
      if trip == 0:
        continue
      if trip is None and worst:
        unknown += 1
      add(visit(callee, depth + 1, worst), 1 if trip is None else trip)
    for branches in comp["branches"]:
      tallies = [visit(b, depth + 1, worst) for b in branches]
      if worst:
        add(max(tallies, key=lambda t: sum(v[1] for v in t.values())), 1)
      else:
        for t in tallies:
          add(t, 1)
    return tally

  by_kind = {k: {"count": c, "bytes": b} for k, (c, b) in visit(entry, 0, True).items()}
  every = visit(entry, 0, False)
  return {
      "by_kind": {k: v for k, v in by_kind.items() if v["count"]},
      "count": sum(v["count"] for v in by_kind.values()),
      "bytes": sum(v["bytes"] for v in by_kind.values()),
      "bytes_all_branches": sum(b for _, b in every.values()),
      "unknown_trip_loops": unknown,
  }


def compiled_figures(compiled: Any) -> dict[str, Any]:
  """Collectives, ``cost_analysis()`` flops and bytes accessed, and
  ``memory_analysis()`` bytes (per device) of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  mem = compiled.memory_analysis()
  return {
      "collectives": collectives(compiled.as_text()),
      "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
  }


def compile_figures(fn: Callable[..., Any], *args: Any, **jit_kwargs: Any) -> dict[str, Any]:
  """:func:`compiled_figures` of ``jax.jit(fn, **jit_kwargs).lower(*args).compile()``."""
  return compiled_figures(jax.jit(fn, **jit_kwargs).lower(*args).compile())
