"""Mask refinement: the model-agnostic PointRend refiner (``pointrend``) and the coarse-mask
degradations it is trained on (``degrade``)."""
