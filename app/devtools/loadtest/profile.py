"""Where a relay's CPU goes: py-spy samples of its process during a load step, summed by what the code is.

``python -m app.devtools.loadtest --profile DIR`` records each measured step (``py-spy record --format raw``, the
collapsed stacks) and prints this summary: the share of samples whose innermost frame is in each part of the
stack (WebSocket framing, the gevent hub and sockets, JSON, base64, the relay's own code, …).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: First match wins: (what it is, substrings of the innermost frame's file).
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("simple-websocket / wsproto framing", ("simple_websocket/", "wsproto/")),
    ("websockets sans-I/O framing", ("websockets/",)),
    ("sansio layer glue (app/websocket.py, app/websocket_sansio.py)", ("app/websocket.py", "app/websocket_sansio.py")),
    ("JSON", ("json/", "orjson")),
    ("base64", ("base64.py",)),
    ("event loop and socket calls (gevent hub and greenlets; asyncio's selector)",
     ("gevent/", "greenlet", "socket.py", "selectors.py")),
    ("threading (locks, events)", ("threading.py",)),
    ("relay core and uplink", ("app/relay/",)),
    ("carrier codecs", ("app/carriers/",)),
    ("Kallglot stream", ("app/kallglot/",)),
    ("metrics", ("prometheus_client/", "app/metrics.py")),
    ("asyncio / uvicorn / starlette / fastapi", ("asyncio/", "uvicorn/", "starlette/", "fastapi/")),
)


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (raw collapsed stacks); returns the py-spy process."""
    beside = Path(sys.executable).parent / "py-spy"  # the virtualenv's, when it is not on the PATH
    binary = str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(max(int(seconds), 1)),
                             "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(raw: Path) -> list[tuple[str, float]]:
    """(part, share of samples) by innermost frame, largest first."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        part = next((name for name, needles in PARTS if any(needle in leaf for needle in needles)), "other")
        counts[part] += int(n)
    total = sum(counts.values()) or 1
    return [(part, count / total) for part, count in counts.most_common()]


def format_summary(raw: Path) -> str:
    """One line: each part's share of the samples."""
    if not raw.exists():
        return "  profile: py-spy wrote nothing (is it installed, and may it read other processes?)"
    return "  CPU by part (py-spy, innermost frame): " + ", ".join(
        f"{part} {share * 100:.0f}%" for part, share in summarize(raw) if share >= 0.01)
