"""segpipe: distributed batch instance segmentation on Ray Data."""

__version__ = "0.1.0"
