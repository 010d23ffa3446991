"""What every Python benchmark shares (peers.py, attention_peers.py, dit_forward.py, sp_forward.py,
report.py; bench/harness.hpp is the C++ side): the shape table of bench/shapes.json, one timer
(CUDA events, or the host clock with a device sync around each run) and JSON lines out and in.

The median is the middle value of the sorted runs, the upper of the two middle values for an even
count, as the C++ benchmarks report it. torch is imported by the timers only, so that the table
printers (report.py, attention_peers.py --table) run where torch is missing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SHAPES_FILE = Path(__file__).resolve().parent / "shapes.json"


# ---- shapes ---------------------------------------------------------------------------------------


def load_shapes(path=SHAPES_FILE):
    """The entries of bench/shapes.json by name, in file order, each with video_tokens added."""
    with open(path) as f:
        entries = json.load(f)["shapes"]
    shapes = {}
    for e in entries:
        frames, height, width = e["latent_grid"]
        shapes[e["name"]] = dict(e, video_tokens=frames * height * width)
    return shapes


SHAPES = load_shapes()


def shape_selected(name, wanted):
    """--shape's rule, as in the C++ benchmarks: "all" selects the in_all shapes, else a name prefix."""
    return SHAPES[name]["in_all"] if wanted == "all" else name.startswith(wanted)


# ---- timing ---------------------------------------------------------------------------------------


def summarize(ms):
    """(median, min) of the runs' milliseconds."""
    ms = sorted(ms)
    return ms[len(ms) // 2], ms[0]


def cuda_ms(fn):
    """(milliseconds, fn's result) of one run of fn between two CUDA events on the current stream."""
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop), result


def time_cuda(fn, warmup, iters, before=None):
    """(median, min) in ms of `iters` runs between CUDA events, after `warmup` untimed runs and a
    device sync. `before`, if given, runs ahead of every run, timed or not, outside the events (a
    barrier of all ranks, say)."""
    import torch

    for _ in range(warmup):
        if before:
            before()
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(iters):
        if before:
            before()
        ms.append(cuda_ms(fn)[0])
    return summarize(ms)


def time_host(fn, iters):
    """(median, min) in ms of `iters` host-timed runs, each between two device syncs (for work that
    syncs with the host itself, such as a planner that reads sizes back)."""
    import torch

    ms = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    return summarize(ms)


# ---- JSON lines -----------------------------------------------------------------------------------


def emit(**fields):
    """One JSON object on one line of stdout, flushed (a reader sees every line printed so far)."""
    print(json.dumps(fields), flush=True)


def read_jsonl(path, lenient=False):
    """The objects of the lines of `path` that start with '{'. lenient: a missing file gives no rows
    and a line that does not parse is passed over (a run cut off by its timeout leaves half a line)."""
    if lenient and (not path or not Path(path).exists()):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not lenient:
                    raise
    return rows


def log(message):
    """Progress on stderr, flushed: stdout holds the JSON lines alone."""
    print(message, file=sys.stderr, flush=True)
