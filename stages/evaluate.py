"""DVC stage: evaluate one example (`python -m stages.evaluate --example toy`)."""

import sys

from pipeline.runner import stage_main
from pipeline.stages.evaluate import evaluate_example

if __name__ == "__main__":
    sys.exit(stage_main(evaluate_example))
