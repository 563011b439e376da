"""DVC stage: evaluate one example. Same as `python -m pipeline evaluate`; see its --help."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
