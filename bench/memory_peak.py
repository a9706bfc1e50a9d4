"""What is alive on the GPU at the allocator's peak: a replay of ``torch.cuda.memory._snapshot()``'s trace.

``torch.cuda.max_memory_allocated`` says how high memory went, not what held it. This replays the allocation trace
recorded by ``torch.cuda.memory._record_memory_history`` (alloc / free events with Python stacks), finds the event
at which the allocated total peaked, and groups the blocks alive at that moment by the first stack frame inside
this repository (a holdall source line or a bench script), so a peak can be traced to the tensors that made it.

    torch.cuda.memory._record_memory_history(max_entries=500_000)
    base = torch.cuda.memory_allocated()
    ...  # the work to look at
    print(peak_report(torch.cuda.memory._snapshot(), base))

Blocks allocated before the recording started are not in the trace: they are reported as one ``before`` line
(``base`` bytes, less any of them freed during the recording).
"""

from __future__ import annotations

from collections import defaultdict

_OURS = ("/holdall/", "/bench/")


def _site(frames: list[dict]) -> str:
    """The innermost frame in this repository (else the innermost frame), as ``file:line function``."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(part in name for part in _OURS):
            return f"{name.rsplit('/', 1)[-1]}:{frame.get('line')} {frame.get('name')}"
    if frames:
        frame = frames[0]
        return f"{frame.get('filename', '?').rsplit('/', 1)[-1]}:{frame.get('line')} {frame.get('name')}"
    return "<no stack>"


def _events(snapshot: dict, device: int) -> list[dict]:
    traces = snapshot.get("device_traces") or []
    if device >= len(traces):
        raise ValueError(f"the snapshot has no trace for device {device}: was _record_memory_history() running?")
    return [e for e in traces[device] if e["action"] in ("alloc", "free_completed")]


def peak_blocks(snapshot: dict, base: int, device: int = 0) -> tuple[int, dict[str, int]]:
    """``(peak bytes, {allocation site: bytes alive at the peak})``; ``base`` = bytes allocated before recording."""
    events = _events(snapshot, device)
    peak, peak_at = _peak(events, base)
    live: dict[int, dict] = {}
    freed_before = 0  # blocks from before the recording, freed before the peak
    for event in events[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif live.pop(event["addr"], None) is None:
            freed_before += event["size"]
    sites: dict[str, int] = defaultdict(int)
    sites["before (allocated when recording started)"] = base - freed_before
    for event in live.values():
        sites[_site(event.get("frames") or [])] += event["size"]
    return peak, dict(sites)


def _peak(events: list[dict], base: int) -> tuple[int, int]:
    """``(peak bytes, index of the event that reached it; -1 = before the recording)``."""
    current, peak, peak_at = base, base, -1
    for i, event in enumerate(events):
        current += event["size"] if event["action"] == "alloc" else -event["size"]
        if current > peak:
            peak, peak_at = current, i
    return peak, peak_at


def peak_stack(snapshot: dict, base: int, device: int = 0, depth: int = 6) -> list[str]:
    """The repository frames (innermost first, at most ``depth``) of the allocation that reached the peak."""
    events = _events(snapshot, device)
    _, peak_at = _peak(events, base)
    if peak_at < 0:
        return []
    frames = [f for f in events[peak_at].get("frames") or [] if any(part in f.get("filename", "") for part in _OURS)]
    return [f"{f['filename'].rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}" for f in frames[:depth]]


def peak_report(snapshot: dict, base: int, device: int = 0, top: int = 25) -> str:
    """A table of the ``top`` allocation sites alive at the peak, largest first, in MiB, and the stack of the
    allocation that reached the peak."""
    peak, sites = peak_blocks(snapshot, base, device)
    lines = [f"peak allocated {peak / 2**20:.1f} MiB; alive at the peak, by allocation site:"]
    for site, size in sorted(sites.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {size / 2**20:10.1f} MiB  {site}")
    stack = peak_stack(snapshot, base, device)
    if stack:
        lines.append("the allocation that reached the peak: " + " <- ".join(stack))
    return "\n".join(lines)
