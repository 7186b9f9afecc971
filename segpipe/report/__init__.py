"""The run report (one self-contained HTML page) and overlay pictures of a finished run.

``build.build_report`` gathers and renders the page (``html``); ``overlay`` draws masks on an
image; ``disagreement`` ranks images for review; ``charts`` draws SVG histograms; ``accuracy``
scores the result sets; ``rundata`` reads the run; ``viz`` makes one image's overlays.
"""
