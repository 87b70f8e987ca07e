#!/usr/bin/env python
"""Same as `dreambooth generate MODEL_DIR --prompt ... [options]`."""
import sys

from dreambooth.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
