"""Where the GPU waits: read a torch.profiler Chrome trace of one train step (train_throughput.py --profile NAME writes
profile-NAME.trace.json.gz) and report the GPU's busy and idle time over the step, and its longest idle gaps, each
with the host call that launched the kernel ending it and how late that launch came. A gap whose kernel was launched
after the GPU had gone idle is time the host lost (Python, dispatch, a sync); one whose kernel was launched earlier is
the GPU waiting on something else. Runs anywhere: no GPU needed. Not a test.

python bench/trace_gaps.py TRACE.json.gz [--top 25] [--out gaps.json]
"""
import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def merged(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def innermost(ops, starts, ts):
    """The shortest CPU op running at host time ts (ops sorted by start)."""
    best = None
    for i in range(bisect.bisect_right(starts, ts) - 1, max(-1, bisect.bisect_right(starts, ts) - 400), -1):
        op = ops[i]
        if op["ts"] <= ts <= op["ts"] + op["dur"] and (best is None or op["dur"] < best["dur"]):
            best = op
    return best["name"] if best else None


def analyse(events: list[dict], top: int) -> dict:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit("no GPU events in this trace (was it recorded with ProfilerActivity.CUDA on a GPU?)")
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    starts = [op["ts"] for op in ops]
    busy = merged((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    span = busy[-1][1] - busy[0][0]
    first_after = {}  # a busy interval's start -> the GPU event that opens it
    for e in gpu:
        first_after.setdefault(e["ts"], e)
    gaps, by_launcher, host_late_us = [], collections.Counter(), 0.0
    for (_, idle_from), (idle_to, _) in zip(busy, busy[1:]):
        kernel = first_after.get(idle_to)
        launch = launches.get(kernel["args"].get("correlation")) if kernel else None
        launcher = innermost(ops, starts, launch["ts"]) if launch else None
        late = launch is not None and launch["ts"] > idle_from
        gap = idle_to - idle_from
        if late:
            host_late_us += gap
            by_launcher[launcher or launch["name"]] += gap
        gaps.append({"at_us": round(idle_from - busy[0][0], 1), "idle_us": round(gap, 1),
                     "next_kernel": kernel["name"][:100] if kernel else None,
                     "launched_by": launcher, "runtime_call": launch["name"] if launch else None,
                     "launched_after_idle_began_us": round(launch["ts"] - idle_from, 1) if launch else None})
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and e["name"].startswith(SYNCS)]
    busy_us = sum(end - start for start, end in busy)
    return {
        "gpu_span_ms": round(span / 1e3, 2), "gpu_busy_ms": round(busy_us / 1e3, 2),
        "gpu_idle_ms": round((span - busy_us) / 1e3, 2), "gpu_idle_fraction": round(1 - busy_us / span, 4),
        "idle_with_the_next_launch_late_ms": round(host_late_us / 1e3, 2), "gaps": len(gaps),
        "syncs": {name: n for name, n in collections.Counter(e["name"] for e in syncs).most_common()},
        "idle_by_launching_op_ms": {k: round(v / 1e3, 2) for k, v in by_launcher.most_common(top)},
        "longest_gaps": sorted(gaps, key=lambda g: -g["idle_us"])[:top],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    result = analyse(load(a.trace), a.top)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
