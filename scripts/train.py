#!/usr/bin/env python
"""Same as `dreambooth train CONFIG.yaml [key=value ...]`."""
import sys

from dreambooth.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
