"""Thin shim: ``python cli.py ...`` is ``segpipe ...``."""

from segpipe.cli import main

if __name__ == "__main__":
    main()
