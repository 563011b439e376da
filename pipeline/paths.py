"""Where each stage of one example reads and writes, relative to the project root."""

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ExamplePaths:
    """Where each stage of one example reads and writes, relative to the project root."""

    root: Path
    example: str

    @property
    def input(self) -> Path:
        return self.root / "data" / self.example / "input.txt"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / self.example / "prepared"

    @property
    def train_tokens(self) -> Path:
        return self.prepared / "train.bin"

    @property
    def val_tokens(self) -> Path:
        return self.prepared / "val.bin"

    @property
    def meta(self) -> Path:
        return self.prepared / "meta.json"

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.example

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / "ckpt.pt"

    @property
    def checkpoints(self) -> Path:
        """Not a DVC output, so DVC does not delete it before re-running the train stage (git ignores it)."""
        return self.model_dir / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        """Saved after every evaluation and on SIGINT/SIGTERM: what an interrupted run resumes from."""
        return self.checkpoints / "latest.pt"

    @property
    def best_checkpoint(self) -> Path:
        """The weights with the lowest validation loss so far."""
        return self.checkpoints / "best.pt"

    @property
    def run_info(self) -> Path:
        """The MLflow run this model was trained in; evaluate and sample log into it."""
        return self.model_dir / "run.json"

    @property
    def history(self) -> Path:
        return self.model_dir / "history.csv"

    @property
    def evals(self) -> Path:
        return self.model_dir / "evals.csv"

    @property
    def loss_plot(self) -> Path:
        return self.model_dir / "loss.png"

    @property
    def train_metrics(self) -> Path:
        return self.model_dir / "train.json"

    @property
    def metrics(self) -> Path:
        return self.model_dir / "metrics.json"

    @property
    def samples(self) -> Path:
        return self.model_dir / "samples.txt"

    @property
    def tune_dir(self) -> Path:
        """The sweep's best parameters and trial table."""
        return self.model_dir / "tune"

    @property
    def tune_plots(self) -> Path:
        """The sweep's pictures: optimisation history, intermediate values, parallel coordinates, importances."""
        return self.model_dir / "tune-plots"

    @property
    def tune_metrics(self) -> Path:
        return self.model_dir / "tune.json"

    @property
    def reports(self) -> Path:
        """Pictures and tables of what the model learned, with a copy of the loss curve."""
        return self.model_dir / "reports"


def shown_path(path: Path) -> str:
    """`models/toy`: relative to the working directory (the project root) when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
