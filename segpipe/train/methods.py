"""What ``segpipe train`` needs to know about each method: its parameters, network and card text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel

from segpipe.config import (DiscLossParams, MaskRCNNParams, PointRendParams, PolarMaskParams, RSISParams, ScorerParams,
                            SpatialEmbParams)


@dataclass(frozen=True)
class MethodSpec:
    params: type[BaseModel]
    build: Callable[..., torch.nn.Module]  # build(params=..., num_classes=...) -> train-mode net returning a loss dict
    builder: str  # the modeling registry key written into cards
    family: str
    paper: str
    ignore_regions: bool = False  # its loss honours targets' ``ignore`` (crowd annotations); else they are background
    limits: Callable[[Any], list[str]] | None = None  # the card's ``limits`` from its validated params


_TILE = ("Crowded images: tile them (a workflow's tiling.mode auto or on; segpipe models eval --tiling on), "
         "so that each tile gets its own bound; tiles are merged before the ensemble. segpipe run and segpipe "
         "models eval count the images (or tiles) that reach the bound and warn.")


def _detections_limit(field: str) -> Callable[[Any], list[str]]:
    def limits(params) -> list[str]:
        n = getattr(params, field)
        return [f"At most {n} instances per image (params.{field}): after NMS the {n} highest-scoring detections "
                f"are kept and the rest are dropped. {_TILE}"]

    return limits


def _cluster_limit(params) -> list[str]:
    n = params.max_instances
    return [f"At most {n} instances per image (params.max_instances): clustering stops after {n} instances and "
            f"the pixels left unclaimed stay background. {_TILE}"]


def _rsis_limit(params) -> list[str]:
    n = params.max_steps
    return [f"At most {n} instances per image (params.max_steps, the decoder's step bound): the decoder emits one "
            f"instance per step and stops at its stop score or after {n} steps; objects it has not reached by step "
            f"{n} are not found (no error, no partial instance), and repeats or specks it drops still use a step. "
            + _TILE]


def _maskrcnn(**kw):
    from segpipe.modeling.maskrcnn import build_network

    return build_network(**kw)


def _polarmask(**kw):
    from segpipe.modeling.polarmask import build_network

    return build_network(**kw)


def _spatialemb(**kw):
    from segpipe.modeling.spatialemb import build_network

    return build_network(**kw)


def _discloss(**kw):
    from segpipe.modeling.discloss import build_network

    return build_network(**kw)


def _rsis(**kw):
    from segpipe.modeling.rsis import build_network

    return build_network(**kw)


def _pointrend(**kw):
    from segpipe.refine.pointrend import build_network

    return build_network(**kw)


def _scorer(*, params, num_classes: int = 1):
    from segpipe.ensemble.scorer import ScorerNet

    return ScorerNet(params)


METHODS: dict[str, MethodSpec] = {
    "maskrcnn": MethodSpec(MaskRCNNParams, _maskrcnn, "maskrcnn", "detection",
                           "Mask R-CNN, He, Gkioxari, Dollar, Girshick, ICCV 2017 (arXiv:1703.06870)",
                           limits=_detections_limit("box_detections_per_img")),
    "polarmask": MethodSpec(PolarMaskParams, _polarmask, "polarmask", "single-shot polar",
                            "PolarMask: Single Shot Instance Segmentation with Polar Representation, "
                            "Xie et al., CVPR 2020 (arXiv:1909.13226)", ignore_regions=True,
                            limits=_detections_limit("detections_per_img")),
    "spatialemb": MethodSpec(SpatialEmbParams, _spatialemb, "spatialemb", "embedding",
                             "Instance Segmentation by Jointly Optimizing Spatial Embeddings and Clustering Bandwidth, "
                             "Neven, De Brabandere, Proesmans, Van Gool, CVPR 2019 (arXiv:1906.11109)",
                             limits=_cluster_limit),
    "discloss": MethodSpec(DiscLossParams, _discloss, "discloss", "embedding",
                           "Semantic Instance Segmentation with a Discriminative Loss Function, "
                           "De Brabandere, Neven, Van Gool, CVPR-W 2017 (arXiv:1708.02551)", limits=_cluster_limit),
    "rsis": MethodSpec(RSISParams, _rsis, "rsis", "recurrent",
                       "Recurrent Neural Networks for Semantic Instance Segmentation, Salvador, Bellver, Campos, Baradad, "
                       "Marques, Torres, Giro-i-Nieto, 2017 (arXiv:1712.00617)", limits=_rsis_limit),
    "pointrend": MethodSpec(PointRendParams, _pointrend, "pointrend", "refinement",
                            "PointRend: Image Segmentation as Rendering, Kirillov, Wu, He, Girshick, CVPR 2020 "
                            "(arXiv:1912.08193); model-agnostic: its own feature network"),
    "scorer": MethodSpec(ScorerParams, _scorer, "scorer", "ensemble scorer",
                         "learned mask-IoU ranking in the spirit of Mask Scoring R-CNN, Huang, Huang, Gong, Huang, Wang, "
                         "CVPR 2019 (arXiv:1903.00241), over the ensemble's evidence"),
}
