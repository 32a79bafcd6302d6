"""The load benchmark's transcript arms (``--transcripts``) and its per-round summary of them (issue 16).

- ``forwarded``: the emulator says transcript lines and the bridge forwards them to the live console's Redis Stream;
- ``not-forwarded``: the same lines, received and parsed by a second bridge started with ``LIVE_TRANSCRIPTS=off``
  (same code, same core): forwarded minus this is what forwarding itself costs (issue 16's figure);
- ``none``: the emulator says no transcript lines: forwarded minus this is the whole cost of live transcripts.

``--pairs N`` rotates the arms' order each round, so a noisy neighbour hits all arms alike.
"""
from __future__ import annotations

import statistics
from typing import Any

#: Arms of a bridge step: (emulator says transcript lines, the bridge forwards them).
ARMS = {"forwarded": (True, True), "not-forwarded": (True, False), "none": (False, True)}
#: ``--transcripts`` → the arms it runs.
ARM_CHOICES = {"on": ["forwarded"], "off": ["none"], "both": ["forwarded", "none"],
               "not-forwarded": ["not-forwarded"], "all": ["forwarded", "not-forwarded", "none"]}



def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def arm_summary(results: list[dict[str, Any]]) -> list[str]:
    """Per layer and step: each round's CPU ms per call-second by arm, the arms' differences, and the medians."""
    lines: list[str] = []
    keys = sorted({(r.get("layer", ""), r["calls"]) for r in results if r.get("arm")})
    for layer, calls in keys:
        rounds: dict[int, dict[str, dict[str, Any]]] = {}
        for r in results:
            if r.get("arm") and (r.get("layer", ""), r["calls"]) == (layer, calls) and "error" not in r:
                rounds.setdefault(r["round"], {})[r["arm"]] = r
        lines.append(f"bridge[{layer}] N={calls}: CPU ms per call-second (µs per caller frame), load average at the end")
        diffs: dict[str, list[float]] = {"forwarded vs not-forwarded": [], "forwarded vs none": [],
                                         "not-forwarded vs none": []}
        per_arm: dict[str, list[float]] = {}
        for n, arms in sorted(rounds.items()):
            cells = []
            for arm in ARMS:
                if arm in arms and arms[arm]["bridge_cpu_ms_per_call_s"] is not None:
                    a = arms[arm]
                    per_arm.setdefault(arm, []).append(a["bridge_cpu_ms_per_call_s"])
                    cells.append(f"{arm} {a['bridge_cpu_ms_per_call_s']:.2f} ({_fmt(a['bridge_cpu_us_per_frame'])})"
                                 f" @{a.get('loadavg_1m')}")
            row = f"  round {n}: " + ", ".join(cells)
            for name in diffs:
                first, second = name.split(" vs ")
                if first in arms and second in arms:
                    x, y = arms[first]["bridge_cpu_ms_per_call_s"], arms[second]["bridge_cpu_ms_per_call_s"]
                    if x is not None and y:
                        diffs[name].append((x / y - 1) * 100)
                        row += f"; {name} {diffs[name][-1]:+.1f} %"
            lines.append(row)
        lines.append("  median: " + ", ".join(f"{arm} {statistics.median(v):.2f}" for arm, v in per_arm.items()) + "; "
                     + ", ".join(f"{name} {statistics.median(v):+.1f} % (of {len(v)} rounds)"
                                 for name, v in diffs.items() if v))
    return lines
