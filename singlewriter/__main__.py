"""``python -m singlewriter``: the same as the ``singlewriter`` command."""

from __future__ import annotations

import sys

from singlewriter.cli import main

if __name__ == "__main__":
    sys.exit(main())
