"""DVC stage: inspect one example (`python -m stages.inspect --example toy`)."""

import sys

from pipeline.runner import stage_main
from pipeline.stages.inspect import inspect_example

if __name__ == "__main__":
    sys.exit(stage_main(inspect_example))
