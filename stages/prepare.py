"""DVC stage: prepare one example (`python -m stages.prepare --example toy`)."""

import sys

from pipeline.runner import stage_main
from pipeline.stages.prepare import prepare_example

if __name__ == "__main__":
    sys.exit(stage_main(prepare_example))
