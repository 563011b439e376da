"""DVC stage: tune one example. Same as `python -m pipeline tune`; see its --help."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
