"""Mask AP of a run's result sets against a ground truth (pycocotools, via segpipe.evaluation).

The result sets: each model's raw predictions/, the unrefined ensemble (the run's predictions
re-fused under its own ensemble and output settings, when the run's ensemble was refined), and
instances/ (the run's result: the ensemble or the primary model, refined when it was).
"""

from __future__ import annotations

import tempfile

from segpipe.evaluation import evaluate_output, load_gt
from segpipe.report.rundata import Run


def _unrefined_ensemble(run: Run, gt: dict, max_dets: int) -> dict:
    """Re-fuse the run's predictions/ into a temporary output and score it."""
    from segpipe.config import EnsembleConfig, OutputConfig
    from segpipe.ensemble.refuse import refuse_run

    cfg = run.manifest["workflow"]["config"]
    filters = {k: cfg["output"][k] for k in ("min_score", "min_confidence", "min_votes") if k in cfg["output"]}
    with tempfile.TemporaryDirectory(prefix="segpipe-report-") as tmp:
        refuse_run(run.uri, tmp, EnsembleConfig.model_validate(cfg["ensemble"]), OutputConfig(uri=tmp, coco=False, **filters),
                   run_id=f"{run.manifest['run_id']}-unrefined", progress=lambda m: None)
        return evaluate_output(tmp, gt, max_dets=max_dets)


def ap_table(run: Run, gt_path: str, *, max_dets: int = 100) -> list[tuple[str, dict]]:
    """[(result set name, ``evaluation.evaluate`` stats)] in the order: each model, the
    unrefined ensemble (refined ensemble runs only), instances/. Raises ValueError when no image
    of the run matches the ground truth by file name."""
    gt = load_gt(gt_path).dataset  # read once
    rows = [(name, evaluate_output(run.uri, gt, max_dets=max_dets, table="predictions", source=name))
            for name in run.model_names]
    if run.is_ensemble and run.refined_by and (run.manifest.get("workflow") or {}).get("config"):
        rows.append(("ensemble, unrefined", _unrefined_ensemble(run, gt, max_dets)))
    rows.append((run.source_label(run.result_source), evaluate_output(run.uri, gt, max_dets=max_dets)))
    return rows
