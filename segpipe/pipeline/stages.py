"""Ray Data UDFs. Each takes and returns a batch dict of numpy columns; no global state.

Rows carry the listing columns (uri, image_id, relpath, size, tag, index, shard), then
``sha256``, ``width``, ``height``, ``image`` (uint8 [H, W, 3]; [0, 0, 3] on error), the error
columns ``error_stage``/``error_type``/``error_message`` ('' when ok), and per model
``pred:<model>`` (Instances.to_bytes(); b'' when not predicted), ``ms:<model>`` (the image's
share of the model stage's wall ms), ``fwd:<model>`` (of which the network's forward) and
``cpu:<model>`` (the CPU ms of that forward, all threads of the actor's process),
``bound:<model>`` (the model's instance bound when the image, or one of its tiles, reached it,
else 0: objects past it may be missing); with an
ensemble, ``pred:ensemble`` / ``meta:ensemble`` (``ensemble.fuse.encode_fused``) and ``ms:ensemble``.
``ms:read`` is fetching the bytes (and hashing them), ``ms:decode`` decoding them.

Every stage takes an optional ``meter`` (a ``pipeline.progress.StageMeter`` actor handle) and
reports each batch to it (images, busy ms, its worker) for live per-stage progress.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _report(meter, stage: str, images: int, busy_ms: float) -> None:
    """Tell the progress meter (fire and forget) that this worker finished a batch."""
    if meter is not None:
        import ray

        meter.add.remote(stage, images, busy_ms, ray.get_runtime_context().get_worker_id())


class _RowLog:
    """One batch's per-row bookkeeping for a stage: the error columns (carried over from the
    input) and each row's wall ms, process CPU ms, and (for a model) forward wall and CPU ms."""

    def __init__(self, batch: dict[str, np.ndarray]) -> None:
        n = len(batch["uri"])
        self.e_stage, self.e_type, self.e_msg = (list(batch[k]) for k in ("error_stage", "error_type", "error_message"))
        self.ms, self.cpu_ms, self.fwd, self.fwd_cpu = (np.zeros(n, np.float64) for _ in range(4))

    def ok(self) -> list[int]:
        """The rows without an error so far."""
        return [i for i in range(len(self.ms)) if not self.e_type[i]]

    def run(self, rows: list[int], fn, stage: str) -> None:
        """``fn(rows)`` on all ``rows`` at once (it stores its own results and returns the
        adapter's step timings or None; the costs are shared evenly). When it raises, each row
        is retried alone, and a row that fails alone becomes an error record of ``stage``."""
        t, c = time.perf_counter(), time.process_time()
        try:
            steps = fn(rows) or {}
        except Exception as e:  # noqa: BLE001 - isolate the failing row, keep the others
            if len(rows) == 1:
                # repr when str is empty (a bare assert): an error record always says something
                self.e_stage[rows[0]], self.e_type[rows[0]], self.e_msg[rows[0]] = stage, type(e).__name__, (str(e) or repr(e))[:2000]
                steps = {}
            else:
                for i in rows:
                    self.run([i], fn, stage)
                return
        k = len(rows)
        self.ms[rows], self.cpu_ms[rows] = (time.perf_counter() - t) * 1000 / k, (time.process_time() - c) * 1000 / k
        self.fwd[rows], self.fwd_cpu[rows] = steps.get("forward", 0.0) / k, steps.get("forward_cpu", 0.0) / k

    def errors(self) -> dict[str, np.ndarray]:
        return {"error_stage": np.asarray(self.e_stage, dtype=object), "error_type": np.asarray(self.e_type, dtype=object),
                "error_message": np.asarray(self.e_msg, dtype=object)}


def read_decode(batch: dict[str, np.ndarray], *, max_pixels: int, max_bytes: int, storage_options: dict | None = None,
                meter=None) -> dict[str, Any]:
    """Read each ``uri`` through fsspec and decode it; failures become error columns, never raise."""
    from segpipe.io.decode import DecodeError, decode_image
    from segpipe.io.fs import resolve

    n = len(batch["uri"])
    images, shas, widths, heights = [], [], [], []
    e_stage, e_type, e_msg = [], [], []
    read_ms, decode_ms = [], []
    for i in range(n):
        uri = str(batch["uri"][i])
        t = t1 = time.perf_counter()
        img, sha, err = EMPTY_IMAGE, "", ("", "", "")
        try:
            if int(batch["size"][i]) > max_bytes:  # size from the listing: no extra request
                raise DecodeError("too_large", f"{int(batch['size'][i])} bytes exceeds max_bytes={max_bytes}")
            fs, path = resolve(uri, **(storage_options or {}))
            data = fs.cat_file(path)
            sha = hashlib.sha256(data).hexdigest()
            t1 = time.perf_counter()
            img = decode_image(data, max_pixels=max_pixels)
        except DecodeError as e:
            err = ("decode", e.error_type, str(e))
        except Exception as e:  # noqa: BLE001 - a bad input must become an error record
            err = ("read", type(e).__name__, str(e)[:2000])
        images.append(img)
        shas.append(sha)
        heights.append(int(img.shape[0]))
        widths.append(int(img.shape[1]))
        e_stage.append(err[0])
        e_type.append(err[1])
        e_msg.append(err[2])
        t2 = time.perf_counter()
        read_ms.append((t1 - t) * 1000)
        decode_ms.append((t2 - t1) * 1000 if t1 > t else 0.0)
    out = {k: batch[k] for k in batch}
    out.update(
        image=_object_array(images),
        sha256=np.asarray(shas, dtype=object),
        width=np.asarray(widths, np.int32),
        height=np.asarray(heights, np.int32),
        error_stage=np.asarray(e_stage, dtype=object),
        error_type=np.asarray(e_type, dtype=object),
        error_message=np.asarray(e_msg, dtype=object),
    )
    out["ms:read"] = np.asarray(read_ms, np.float64)
    out["ms:decode"] = np.asarray(decode_ms, np.float64)
    _report(meter, "read", n, sum(read_ms) + sum(decode_ms))
    return out


class ModelStage:
    """An actor hosting one zoo model: weights loaded once in ``__init__``.

    ``keep_image`` False drops the decoded image column after this stage (the last model stage),
    so only predictions travel on to the sinks.
    """

    def __init__(self, *, model_ref: str, model_name: str, use_gpu: bool, num_threads: int,
                 score_threshold: float | None, keep_image: bool, zoo_dir: str | None = None,
                 tiling: dict | None = None, batch_size: int = 4, meter=None) -> None:
        import torch

        from segpipe.config import TilingConfig
        from segpipe.modeling.tiled import default_tile
        from segpipe.modeling.zoo import DEFAULT_ZOO, load_adapter

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.adapter, self.card = load_adapter(model_ref, device=device, zoo=DEFAULT_ZOO if zoo_dir is None else Path(zoo_dir))
        if score_threshold is not None:
            self.adapter.set_score_threshold(score_threshold)
        self.name = model_name
        self.keep_image = keep_image
        self.tiling = TilingConfig.model_validate(tiling or {})
        self.tile = self.tiling.tile or default_tile(self.card)
        self.batch_size = batch_size
        self.meter = meter

    def _tiles(self, image: np.ndarray) -> bool:
        from segpipe.modeling.tiled import needs_tiling

        return needs_tiling(int(image.shape[0]), int(image.shape[1]), self.tile, self.tiling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["uri"])
        cached = batch.get(f"cached:{self.name}")  # incremental: an earlier run's prediction rides along
        log = _RowLog(batch)
        ok = [i for i in log.ok() if not (cached is not None and cached[i])]
        tiled = [i for i in ok if self._tiles(batch["image"][i])]
        ok = [i for i in ok if i not in tiled]
        preds = [b""] * n if cached is None else [batch[f"pred:{self.name}"][i] if cached[i] else b"" for i in range(n)]
        bound = np.zeros(n, np.int64)
        cap = self.adapter.instance_bound or 0
        t_batch = time.perf_counter()

        def predict(rows: list[int]) -> dict[str, float]:
            steps: dict[str, float] = {}
            flags: list[bool] = []
            for i, inst, hit in zip(rows, self.adapter.predict([batch["image"][i] for i in rows], steps, flags), flags):
                preds[i] = inst.to_bytes()
                bound[i] = cap if hit else 0
            return steps

        def predict_tiled(rows: list[int]) -> dict[str, float]:
            from segpipe.modeling.tiled import tiled_predict

            steps: dict[str, float] = {}
            flags: list[bool] = []
            preds[rows[0]] = tiled_predict(self.adapter, batch["image"][rows[0]], self.tile, self.tiling, self.batch_size,
                                           steps, flags).to_bytes()
            bound[rows[0]] = cap if flags[0] else 0
            return steps

        if ok:
            log.run(ok, predict, f"model:{self.name}")
        for i in tiled:
            log.run([i], predict_tiled, f"model:{self.name}")
        out = {k: batch[k] for k in batch if self.keep_image or k != "image"}
        out[f"pred:{self.name}"] = _object_array(preds)
        out[f"ms:{self.name}"] = log.ms
        out[f"fwd:{self.name}"] = log.fwd
        out[f"cpu:{self.name}"] = log.fwd_cpu
        out[f"cpu_ms:{self.name}"] = log.cpu_ms  # the whole predict's process CPU ms (pre/post-processing included)
        out[f"bound:{self.name}"] = bound
        out.update(log.errors())
        _report(self.meter, self.name, n, (time.perf_counter() - t_batch) * 1000)
        return out


def fuse_batch(batch: dict[str, np.ndarray], *, models: list[list[str]], config: dict, meter=None,
               scorer=None) -> dict[str, Any]:
    """Fuse the models' instances of each ok row (``models``: [card name, version] pairs in
    workflow order; ``config``: an ``EnsembleConfig`` as a dict; ``scorer``: the ensemble
    scorer's ``ScorerWeights`` or None), the batch's images in one ``fuse_images`` call. Errored
    rows get b'' / ''; an image whose fusion fails becomes an error record (stage ``ensemble``)."""
    from segpipe.config import EnsembleConfig

    cfg = EnsembleConfig.model_validate(config)
    n = len(batch["uri"])
    preds, metas = [b""] * n, [""] * n
    log = _RowLog(batch)

    def fuse(rows: list[int]) -> None:
        for i, enc in zip(rows, _fuse_rows(batch, rows, models, cfg, scorer)):
            preds[i], metas[i] = enc

    ok = log.ok()
    if ok:
        log.run(ok, fuse, "ensemble")
    out = {k: batch[k] for k in batch}
    out["pred:ensemble"] = _object_array(preds)
    out["meta:ensemble"] = np.asarray(metas, dtype=object)
    out["ms:ensemble"] = log.ms
    out["cpu_ms:ensemble"] = log.cpu_ms
    out.update(log.errors())
    _report(meter, "ensemble", n, float(log.ms.sum()))
    return out


def _fuse_rows(batch: dict[str, np.ndarray], rows: list[int], models: list[list[str]], cfg, scorer) -> list[tuple[bytes, str]]:
    """Fuse rows ``rows`` of ``batch`` in one ``fuse_images`` call -> their ``encode_fused`` pairs."""
    from segpipe.ensemble.fuse import ModelOutput, encode_fused, fuse_images
    from segpipe.structures import Instances

    fused = fuse_images([[ModelOutput(name=name, version=version, instances=Instances.from_bytes(batch[f"pred:{name}"][i]))
                          for name, version in models] for i in rows], cfg)
    if scorer is not None:
        from segpipe.ensemble.scorer import rescore

        fused = [rescore(f, scorer, cfg.rank) for f in fused]
    return [encode_fused(f) for f in fused]


class RefineStage:
    """An actor hosting a refiner (a pointrend card): refines the instances in ``pred:<source>``
    (the ensemble's or the primary model's) into ``pred:refined`` and drops the image column.
    A refinement that fails on an image turns that row into an error record, as a model would."""

    def __init__(self, *, model_ref: str, source: str, use_gpu: bool, num_threads: int, zoo_dir: str | None = None,
                 meter=None, min_score: float = 0.0) -> None:
        import torch

        from segpipe.modeling.zoo import DEFAULT_ZOO, load_adapter

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.refiner, self.card = load_adapter(model_ref, device=device, zoo=DEFAULT_ZOO if zoo_dir is None else Path(zoo_dir))
        self.source = source
        self.meter = meter
        self.min_score = min_score

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["uri"])
        preds = [b""] * n
        log = _RowLog(batch)

        def refine(rows: list[int]) -> None:  # the rows' images together: they share the refiner's per-call cost
            for i, inst in zip(rows, self._refine(batch, rows)):
                preds[i] = inst.to_bytes()

        ok = log.ok()
        if ok:
            log.run(ok, refine, f"refine:{self.card.name}")
        out = {k: batch[k] for k in batch if k != "image"}
        out["pred:refined"] = _object_array(preds)
        out["ms:refine"] = log.ms
        out["cpu_ms:refine"] = log.cpu_ms
        out.update(log.errors())
        _report(self.meter, "refine", n, float(log.ms.sum()))
        return out

    def _refine(self, batch: dict[str, np.ndarray], rows: list[int]) -> list:
        """Refine rows ``rows`` of ``batch`` in one ``refine_batch`` call -> their Instances."""
        from segpipe.ensemble.fuse import decode_fused
        from segpipe.structures import Instances

        insts, spreads = [], []
        for i in rows:
            if self.source == "ensemble":  # the members' disagreement feeds the point head
                fused = decode_fused(batch["pred:ensemble"][i], batch["meta:ensemble"][i])
                insts.append(fused.instances)
                spreads.append(fused.spread)
            else:
                insts.append(Instances.from_bytes(batch[f"pred:{self.source}"][i]))
                spreads.append(None)
        return self.refiner.refine_batch([batch["image"][i] for i in rows], insts, spreads, self.min_score)
