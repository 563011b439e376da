"""DVC stage: sample one example (`python -m stages.sample --example toy`)."""

import sys

from pipeline.runner import stage_main
from pipeline.stages.sample import sample_example

if __name__ == "__main__":
    sys.exit(stage_main(sample_example))
