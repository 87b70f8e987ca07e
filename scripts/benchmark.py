#!/usr/bin/env python3
"""Thin wrapper: `python scripts/benchmark.py [options]` is `dreambooth bench [options]` (see --help)."""

import sys

from dreambooth.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
