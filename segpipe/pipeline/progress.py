"""Per-stage progress while a run streams, and the per-stage account at its end.

``StageMeter`` is a plain class that the pipeline hosts as a zero-CPU Ray actor; every stage
reports each finished batch to it (images, busy ms, its worker id). ``Reporter`` polls it from a
driver thread and prints one line per interval: per stage, images done, rate and ETA.
``stage_table`` turns a finished run's summed stage times into the manifest's ``stages`` and
``efficiency`` records (pure).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

# Flow order of the non-model stages around the models.
BEFORE_MODELS = ("read", "decode")
AFTER_MODELS = ("ensemble", "refine", "write")


class StageMeter:
    """Counts per stage: images, busy ms, distinct workers, first/last report (epoch seconds)."""

    def __init__(self) -> None:
        self._stages: dict[str, dict] = {}

    def add(self, stage: str, images: int, busy_ms: float, worker: str) -> None:
        now = time.time()
        s = self._stages.setdefault(stage, {"images": 0, "busy_ms": 0.0, "workers": set(), "first": now, "last": now,
                                            "first_images": int(images)})
        s["images"] += int(images)
        s["busy_ms"] += float(busy_ms)
        s["workers"].add(worker)
        s["last"] = now

    def snapshot(self) -> dict[str, dict]:
        """{stage: {images, busy_ms, workers (count), first, last, first_images}}: ``first``/``last``
        are when the first/last batch was reported, ``first_images`` the first batch's size."""
        return {k: {**v, "workers": len(v["workers"])} for k, v in self._stages.items()}


class Ticker:
    """Progress of an in-process loop: ``tick(n)`` after each step; prints ``label done/total,
    rate/s, ETA`` at most every ``interval_s`` and when the total is reached."""

    def __init__(self, label: str, total: int, emit: Callable[[str], None], interval_s: float = 10.0) -> None:
        self.label, self.total, self.emit, self.interval_s = label, total, emit, interval_s
        self.done = 0
        self._t0 = self._last = time.perf_counter()

    def tick(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last < self.interval_s and self.done < self.total:
            return
        self._last = now
        el = now - self._t0
        rate = self.done / el if el > 0 else 0.0
        self.emit(f"{self.label} {self.done}/{self.total} {rate:.1f}/s {_eta_label(self.total - self.done, rate)} [{_eta(el)}]")


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _eta_label(left: int, rate: float) -> str:
    """'done', 'ETA <time>' for ``left`` items at ``rate`` per second, or 'ETA ?' without a rate."""
    return "done" if left <= 0 else (f"ETA {_eta(left / rate)}" if rate > 0 else "ETA ?")


def progress_line(snapshot: dict[str, dict], order: list[str], total: int, committed: int, elapsed_s: float,
                  now: float) -> str:
    """One line: per stage in ``order`` (those reported so far) ``name done/total rate/s ETA``,
    then the committed count. A stage's rate counts the images after its first batch over the
    time since that batch (epoch seconds, ``now``), so startup does not drag it down."""
    parts = []
    for name in order:
        s = snapshot.get(name)
        if s is None:
            parts.append(f"{name} 0/{total}")
            continue
        span = now - s["first"]
        rate = (s["images"] - s["first_images"]) / span if span > 0 else 0.0
        parts.append(f"{name} {s['images']}/{total} {rate:.1f}/s {_eta_label(total - s['images'], rate)}")
    return f"[{_eta(elapsed_s)}] " + " | ".join(parts) + f" | committed {committed}/{total}"


class Reporter:
    """A driver thread that prints ``progress_line`` every ``interval_s`` from a meter actor."""

    def __init__(self, meter, order: list[str], total: int, interval_s: float, emit: Callable[[str], None],
                 committed: Callable[[], int]) -> None:
        self.meter, self.order, self.total, self.interval_s = meter, order, total, interval_s
        self.emit, self.committed = emit, committed
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="segpipe-progress", daemon=True)

    def start(self) -> "Reporter":
        self._thread.start()
        return self

    def snapshot(self, timeout: float = 10.0) -> dict[str, dict]:
        import ray

        return ray.get(self.meter.snapshot.remote(), timeout=timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                snap = self.snapshot()
            except Exception:  # noqa: BLE001 - progress must never fail a run
                continue
            self._emit_line(snap)

    def _emit_line(self, snap: dict[str, dict]) -> None:
        self.emit(progress_line(snap, self.order, self.total, self.committed(), time.perf_counter() - self._t0, time.time()))

    def stop(self) -> dict[str, dict]:
        """Stop printing, print the final line; return the meter's last snapshot ({} when it
        cannot be read)."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        try:
            snap = self.snapshot()
        except Exception:  # noqa: BLE001
            return {}
        self._emit_line(snap)
        return snap


def stage_table(stage_ms: dict[str, float], forward_ms: dict[str, float], models: list[str], images: int,
                exec_wall_s: float, workers: dict[str, int], kinds: dict[str, str], driver_wait_ms: float,
                first_row_s: float | None, active: dict[str, int] | None = None, *,
                forward_cpu_ms: dict[str, float] | None = None, cpus: float | None = None) -> tuple[list[dict], dict]:
    """A finished run's per-stage account (pure).

    ``stage_ms``: summed busy ms per stage (read, decode, each model, ensemble, refine, write);
    ``forward_ms``: each model's summed network forward ms; ``exec_wall_s``: seconds from the
    start of streaming to the last row; ``workers``: per stage, its actor pool's size, or for
    tasks the worker processes seen (``kinds``: task, actor or driver); ``active``: the workers
    seen doing work; ``forward_cpu_ms``: each model's forward in CPU ms (all threads); ``cpus``:
    the CPUs the run had. Returns (stages in flow order: name, kind, workers, active_workers,
    images, busy_ms, ms_per_image, forward_ms, forward_cpu_ms, utilization = busy / (wall x
    workers)) and the efficiency record: model_forward_ms, pipeline_efficiency = forward / wall,
    model_forward_cpu_ms, cpu_efficiency = forward CPU / (wall x cpus) (the share of the
    machine spent in model forward passes), cpus, driver_wait_ms, startup_s (to the first row),
    bottleneck (the stage with the highest utilization: the others wait on it).
    """
    wall_ms = exec_wall_s * 1000
    rows = []
    for name in [*BEFORE_MODELS, *models, *AFTER_MODELS]:
        if name not in stage_ms:
            continue
        kind = kinds.get(name, "task")
        pool = "read" if name == "decode" else name  # decoding runs in the read tasks
        n = 1 if kind == "driver" else workers.get(name) or workers.get(pool)
        busy = float(stage_ms[name])
        util = busy / (wall_ms * n) if n and wall_ms > 0 else None
        seen = (active or {}).get(pool)
        rows.append({"name": name, "kind": kind, "workers": n, "active_workers": 1 if kind == "driver" else seen,
                     "images": images, "busy_ms": round(busy, 1),
                     "ms_per_image": round(busy / images, 2) if images else None,
                     "forward_ms": round(forward_ms[name], 1) if name in forward_ms else None,
                     "forward_cpu_ms": round(forward_cpu_ms[name], 1) if forward_cpu_ms and name in forward_cpu_ms else None,
                     "utilization": round(util, 3) if util is not None else None})
    fwd = float(sum(forward_ms.values()))
    if "decode" in stage_ms and "read" in stage_ms:  # read and decode share tasks: their utilization is joint
        joint = [r for r in rows if r["name"] in ("read", "decode")]
        u = sum(r["utilization"] or 0.0 for r in joint)
        for r in joint:
            r["utilization_joint"] = round(u, 3)
    ranked = [r for r in rows if r["utilization"] is not None]
    bottleneck = max(ranked, key=lambda r: r.get("utilization_joint", r["utilization"]))["name"] if ranked else None
    cpu = float(sum((forward_cpu_ms or {}).values()))
    eff = {"wall_s": round(exec_wall_s, 3), "model_forward_ms": round(fwd, 1),
           "pipeline_efficiency": round(fwd / wall_ms, 4) if wall_ms > 0 else None,
           "model_forward_cpu_ms": round(cpu, 1) if forward_cpu_ms is not None else None,
           "cpu_efficiency": round(cpu / (wall_ms * cpus), 4) if forward_cpu_ms is not None and cpus and wall_ms > 0 else None,
           "cpus": cpus,
           "driver_wait_ms": round(driver_wait_ms, 1), "startup_s": round(first_row_s, 3) if first_row_s is not None else None,
           "bottleneck": bottleneck}
    return rows, eff


def format_stage_table(stages: list[dict], eff: dict) -> str:
    """The one-screen stage table of a run summary."""
    lines = [f"  {'stage':<22} {'kind':<6} {'workers':>7} {'busy s':>8} {'ms/img':>8} {'fwd s':>7} {'util':>6}"]
    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in stages:
        lines.append(f"  {r['name']:<22} {r['kind']:<6} {num(r['workers'], 'd'):>7} {r['busy_ms'] / 1000:>8.2f} "
                     f"{num(r['ms_per_image'], '.1f'):>8} {num(r['forward_ms'] and r['forward_ms'] / 1000, '.2f'):>7} "
                     f"{num(r.get('utilization_joint', r['utilization']), '.2f'):>6}")
    pe = eff.get("pipeline_efficiency")
    ce = eff.get("cpu_efficiency")
    lines.append(f"  streaming {eff['wall_s']:.1f}s (first row after {eff.get('startup_s') or 0:.1f}s); model forward "
                 f"{eff['model_forward_ms'] / 1000:.1f}s = efficiency {pe if pe is not None else float('nan'):.2f}"
                 + (f" (forward CPU {eff['model_forward_cpu_ms'] / 1000:.1f} core-s = {100 * ce:.0f}% of {eff['cpus']:g} CPUs)"
                    if ce is not None else "")
                 + f"; driver waited {eff['driver_wait_ms'] / 1000:.1f}s; bottleneck: {eff['bottleneck']}")
    return "\n".join(lines)
