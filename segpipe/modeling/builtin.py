"""Imports every built-in method module so that its builder registers."""

from segpipe.modeling import maskrcnn  # noqa: F401
from segpipe.modeling import polarmask  # noqa: F401
from segpipe.modeling import spatialemb  # noqa: F401
from segpipe.modeling import discloss  # noqa: F401
from segpipe.modeling import rsis  # noqa: F401
from segpipe.refine import refiner  # noqa: F401
from segpipe.ensemble import scorer  # noqa: F401
