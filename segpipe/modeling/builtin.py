"""Imports every built-in method module so that its builder registers."""

from segpipe.modeling import maskrcnn  # noqa: F401
