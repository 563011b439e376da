"""DVC stage: inspect one example. Same as `python -m pipeline inspect`; see its --help."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
