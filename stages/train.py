"""DVC stage: train one example (`python -m stages.train --example toy`)."""

import sys

from pipeline.runner import stage_main
from pipeline.stages.train import train_example

if __name__ == "__main__":
    sys.exit(stage_main(train_example))
