"""DVC stage: sample one example. Same as `python -m pipeline sample`; see its --help."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
