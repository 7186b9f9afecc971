"""What ``segpipe train`` needs to know about each method: its parameters, network and card text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
                           "Mask R-CNN, He, Gkioxari, Dollar, Girshick, ICCV 2017 (arXiv:1703.06870)"),
    "polarmask": MethodSpec(PolarMaskParams, _polarmask, "polarmask", "single-shot polar",
                            "PolarMask: Single Shot Instance Segmentation with Polar Representation, "
                            "Xie et al., CVPR 2020 (arXiv:1909.13226)", ignore_regions=True),
    "spatialemb": MethodSpec(SpatialEmbParams, _spatialemb, "spatialemb", "embedding",
                             "Instance Segmentation by Jointly Optimizing Spatial Embeddings and Clustering Bandwidth, "
                             "Neven, De Brabandere, Proesmans, Van Gool, CVPR 2019 (arXiv:1906.11109)"),
    "discloss": MethodSpec(DiscLossParams, _discloss, "discloss", "embedding",
                           "Semantic Instance Segmentation with a Discriminative Loss Function, "
                           "De Brabandere, Neven, Van Gool, CVPR-W 2017 (arXiv:1708.02551)"),
    "rsis": MethodSpec(RSISParams, _rsis, "rsis", "recurrent",
                       "Recurrent Neural Networks for Semantic Instance Segmentation, Salvador, Bellver, Campos, Baradad, "
                       "Marques, Torres, Giro-i-Nieto, 2017 (arXiv:1712.00617)"),
    "pointrend": MethodSpec(PointRendParams, _pointrend, "pointrend", "refinement",
                            "PointRend: Image Segmentation as Rendering, Kirillov, Wu, He, Girshick, CVPR 2020 "
                            "(arXiv:1912.08193); model-agnostic: its own feature network"),
    "scorer": MethodSpec(ScorerParams, _scorer, "scorer", "ensemble scorer",
                         "learned mask-IoU ranking in the spirit of Mask Scoring R-CNN, Huang, Huang, Gong, Huang, Wang, "
                         "CVPR 2019 (arXiv:1903.00241), over the ensemble's evidence"),
}
