"""`segpipe bench memory`: peak memory of a run over N small images, for several N.

Each count runs as its own `segpipe run` process (a fresh driver and embedded Ray). A sampler
reads that process and all its descendants (Ray's GCS, raylet and workers) every
``interval_s``: the peak of the summed PSS (proportional set size: shared pages, e.g. the
object store, split between the processes that map them, so nothing is counted twice), the
peak of the summed RSS, and the driver's own peak RSS. A pipeline whose memory is bounded by its
window shows the same peaks for 1k and 10k images.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

MIB = 2**20


class TreeSampler:
    """Samples a process tree's memory in a thread until ``stop``; peaks in MiB."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = {"tree_pss_mib": 0.0, "tree_rss_mib": 0.0, "driver_rss_mib": 0.0, "processes": 0}
        self.samples: list[tuple[float, float]] = []  # (seconds, tree PSS MiB)
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
            driver = self.root.memory_info().rss
        except psutil.Error:
            return
        pss = rss = 0
        for p in procs:
            try:
                full = p.memory_full_info()
            except psutil.Error:  # ended between the listing and the read
                continue
            pss += getattr(full, "pss", full.rss)
            rss += full.rss
        pk = self.peak
        pk["tree_pss_mib"] = max(pk["tree_pss_mib"], pss / MIB)
        pk["tree_rss_mib"] = max(pk["tree_rss_mib"], rss / MIB)
        pk["driver_rss_mib"] = max(pk["driver_rss_mib"], driver / MIB)
        pk["processes"] = max(pk["processes"], len(procs))
        self.samples.append((round(time.perf_counter() - self._t0, 2), round(pss / MIB, 1)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in self.peak.items()}


def flatness_workflow(model: str, batch_size: int = 16) -> dict:
    """The workflow of the memory runs: one model, one actor, default shards and pipeline window."""
    return {"name": "bench-memory", "source": {"uri": "unset"}, "output": {"uri": "unset", "coco": True},
            "models": [{"model": model, "num_cpus": 1, "concurrency": 1, "batch_size": batch_size}],
            "pipeline": {"read_num_cpus": 0.5, "read_batch_size": batch_size, "progress": "off"}}


def prepare(data: Path, n: int, size: int, seed: int = 31337) -> Path:
    """``n`` synthetic shapes images of ``size``² (1 to 4 objects) in ``data`` (made once)."""
    from segpipe.config import SynthSpec
    from segpipe.data.synthetic import ensure_dataset

    ensure_dataset(SynthSpec(n=n, seed=seed, height=size, width=size, min_objects=1, max_objects=4, min_size=10,
                             max_size=size / 2.5), data)
    return data / "images"


def run_count(workflow: Path, images: Path, n: int, out: Path, interval_s: float) -> dict:
    """One `segpipe run` over the first ``n`` images, sampled; wall, peaks, images/s."""
    cmd = [sys.executable, "-c", "from segpipe.cli import main; main()", "run", str(workflow),
           "--set", f"source.uri={images}", "--set", f"source.max_images={n}", "--set", f"output.uri={out}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, interval_s).start()
    log, _ = proc.communicate()
    peaks = sampler.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"segpipe run over {n} images failed ({proc.returncode}):\n{log[-3000:]}")
    manifest = json.loads((out / "_segpipe" / "run.json").read_text())
    return {"images": n, "wall_s": round(wall, 1), "images_per_s": manifest["images_per_s"],
            "instances": manifest["counts"]["instances"], "run_id": manifest["run_id"], **peaks,
            "samples": sampler.samples[:: max(1, len(sampler.samples) // 200)]}


def run(counts: list[int], *, model: str, size: int, data: Path, interval_s: float = 0.5, log=print) -> dict:
    images = prepare(data, max(counts), size)
    cfg = flatness_workflow(model)
    res = {"model": model, "image_size": size, "data": str(images), "workflow": cfg, "interval_s": interval_s, "runs": []}
    with tempfile.TemporaryDirectory(prefix="segpipe-bench-mem-") as tmp:
        wf = Path(tmp) / "workflow.yaml"
        wf.write_text(yaml.safe_dump(cfg))
        for n in counts:
            log(f"run over {n} images ...")
            r = run_count(wf, images, n, Path(tmp) / f"out-{n}", interval_s)
            log(f"  {r['wall_s']}s, peak tree PSS {r['tree_pss_mib']} MiB, driver RSS {r['driver_rss_mib']} MiB")
            res["runs"].append(r)
    base = res["runs"][0]
    for r in res["runs"][1:]:
        r["pss_growth_vs_first"] = round(r["tree_pss_mib"] / base["tree_pss_mib"] - 1, 3)
    return res


def table(res: dict) -> str:
    lines = ["| images | wall s | images/s | peak PSS, all processes (MiB) | peak RSS sum (MiB) | driver peak RSS (MiB) | processes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        lines.append(f"| {r['images']} | {r['wall_s']} | {r['images_per_s']:.1f} | {r['tree_pss_mib']:.0f} | "
                     f"{r['tree_rss_mib']:.0f} | {r['driver_rss_mib']:.0f} | {r['processes']} |")
    return "\n".join(lines)
