"""DVC stage: tune one example (`python -m stages.tune --example toy`)."""

import sys

from pipeline.runner import stage_main
from pipeline.stages.tune import tune_example

if __name__ == "__main__":
    sys.exit(stage_main(tune_example))
