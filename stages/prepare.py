"""DVC stage: prepare one example. Same as `python -m pipeline prepare`; see its --help."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
