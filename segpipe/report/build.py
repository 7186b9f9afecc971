"""``build_report``: gather a finished run's facts, overlays and charts, and render the page."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Callable

from segpipe.report import overlay as ov
from segpipe.report.charts import histogram_svg
from segpipe.report.disagreement import disagreement_by_image, review_queue, sample_ids
from segpipe.report.rundata import Run, open_run, read_pixels, source_rows
from segpipe.sinks.writer import read_committed

MAX_ERRORS_LISTED = 20
MAX_QUEUE_LISTED = 100


@dataclass(frozen=True)
class Panel:
    """One overlay in the gallery: a caption and the encoded picture as a data URI."""

    label: str
    data_uri: str
    width: int
    height: int
    n_instances: int


@dataclass(frozen=True)
class GalleryItem:
    """One image in the gallery; ``groups`` holds ``sample`` and/or ``review``."""

    image_id: int
    relpath: str
    groups: tuple[str, ...]
    disagreement: float | None
    panels: list[Panel]


@dataclass
class ReportData:
    """Everything the page shows, computed; ``html.render`` only formats it."""

    run: Run
    errors: list[dict]
    n_errors: int
    gallery: list[GalleryItem]
    disagreement: dict[int, float] | None  # None: no ensemble, no review queue
    queue: list[int]  # image ids by disagreement, highest first (at most MAX_QUEUE_LISTED)
    n_sample: int
    histograms: list[str]
    ap: list[tuple[str, dict]] | None = None
    gt: str | None = None
    max_dets: int = 100
    settings: dict = field(default_factory=dict)


def data_uri(pixels, fmt: str) -> str:
    """RGB uint8 [H, W, 3] -> a ``data:image/...;base64,`` URI."""
    return f"data:image/{fmt};base64," + base64.b64encode(ov.encode(pixels, fmt)).decode("ascii")


def _gallery(run: Run, sample: list[int], review: list[int], scores: dict[int, float] | None, *, max_side: int,
             min_score: float, fmt: str) -> list[GalleryItem]:
    """The gallery cards: review-queue images first (the result and every model's overlay), then
    the sample (the result's overlay)."""
    by_id = {int(im["image_id"]): im for im in run.ok_images()}
    order = list(dict.fromkeys(review + sample))
    images = [by_id[i] for i in order]
    rows = source_rows(run, [run.result_source], images)
    if review:
        rows |= source_rows(run, run.model_names, [by_id[i] for i in review])
    items = []
    for i in order:
        im = by_id[i]
        pixels = read_pixels(run, im)
        panels = []
        for s in [run.result_source] + (run.model_names if i in review else []):
            r = rows[s][i]
            pic = ov.overlay(pixels, r, max_side=max_side, min_score=min_score)
            panels.append(Panel(label=run.source_label(s), data_uri=data_uri(pic, fmt), width=pic.shape[1],
                                height=pic.shape[0], n_instances=sum(x["score"] >= min_score for x in r)))
        groups = tuple(g for g, ids in (("review", review), ("sample", sample)) if i in ids)
        items.append(GalleryItem(image_id=i, relpath=im["relpath"], groups=groups,
                                 disagreement=None if scores is None else scores.get(i, 0.0), panels=panels))
    return items


def _histograms(run: Run, inst: list[dict], scores: dict[int, float] | None) -> list[str]:
    """Score (instances/), agreement and per-image disagreement (ensembles), and each model's
    raw score histograms, as SVG."""
    charts = [histogram_svg([r["score"] for r in inst], title=f"score, {run.source_label(run.result_source)}",
                            xlabel="score")]
    if scores is not None:
        charts.append(histogram_svg([r["agreement"] for r in inst if r["agreement"] is not None],
                                    title="agreement of fused instances (2+ votes)", xlabel="mean pairwise mask IoU"))
        charts.append(histogram_svg(list(scores.values()), title="disagreement per image", xlabel="disagreement"))
    preds = read_committed(run.uri, "predictions", columns=["source", "score"]).to_pylist()
    for name in run.model_names:
        charts.append(histogram_svg([r["score"] for r in preds if r["source"] == name], title=f"score, {name} (raw)",
                                    xlabel="score"))
    return charts


def build_report(run_uri: str, gt: str | None = None, *, n_sample: int = 12, n_review: int = 12, max_side: int = 448,
                 min_score: float = 0.3, max_dets: int | None = None, image_format: str = "jpeg",
                 progress: Callable[[str], None] = lambda m: None) -> str:
    """The self-contained HTML report of the finished run at ``run_uri`` (a path or URI) -> the page.

    ``gt``: a COCO ground truth (path or URI) to score every model, the unrefined ensemble and
    the result against (maxDets ``max_dets``, default the workflow's ``eval.max_dets`` or 100).
    The gallery holds at most ``n_sample`` evenly spread images and the ``n_review`` images of
    highest disagreement (ensembles only), overlays downscaled to ``max_side`` pixels, showing
    instances scoring at least ``min_score``, encoded as ``image_format`` (jpeg or png).
    Raises FileNotFoundError for a missing run, ValueError when ``gt`` matches no image.
    """
    from segpipe.report import html

    run = open_run(run_uri)
    cfg = (run.manifest.get("workflow") or {}).get("config") or {}
    max_dets = max_dets or int((cfg.get("eval") or {}).get("max_dets", 100))
    ap = None
    if gt is not None:
        from segpipe.report.accuracy import ap_table

        progress(f"scoring against {gt}")
        ap = ap_table(run, gt, max_dets=max_dets)
    inst = read_committed(run.uri, "instances", columns=["image_id", "score", "n_votes", "agreement"]).to_pylist()
    ok_ids = [int(im["image_id"]) for im in run.ok_images()]
    scores = disagreement_by_image(inst, len(run.model_names), ok_ids) if run.is_ensemble else None
    queue = review_queue(scores, MAX_QUEUE_LISTED) if scores is not None else []
    sample = sample_ids(ok_ids, n_sample)
    progress(f"overlays: {len(sample)} sampled, {min(n_review, len(queue))} from the review queue")
    gallery = _gallery(run, sample, queue[:n_review], scores, max_side=max_side, min_score=min_score, fmt=image_format)
    errors = read_committed(run.uri, "errors").to_pylist()
    data = ReportData(
        run=run, errors=sorted(errors, key=lambda e: e["uri"])[:MAX_ERRORS_LISTED], n_errors=len(errors),
        gallery=gallery, disagreement=scores, queue=queue, n_sample=n_sample,
        histograms=_histograms(run, inst, scores), ap=ap, gt=gt, max_dets=max_dets,
        settings={"max_side": max_side, "min_score": min_score, "n_review": n_review, "format": image_format},
    )
    return html.render(data)
