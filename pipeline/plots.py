"""Pictures people would rather look at than read: the loss curve of a training run."""

import io

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.files import write_bytes  # noqa: E402


def loss_curve_png(history: pd.DataFrame, evals: pd.DataFrame, title: str) -> bytes:
    """Per-step training loss (raw and smoothed) with the periodic evaluations on top."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(history.step, history.train_loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (batch)")
    smooth = history.train_loss.ewm(alpha=0.05).mean()
    ax.plot(history.step, smooth, color="tab:blue", linewidth=1.5, label="train (smoothed)")
    ax.plot(evals.step, evals.val_loss, "o-", color="tab:orange", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def save_loss_curve(path, history: pd.DataFrame, evals: pd.DataFrame, title: str) -> None:
    write_bytes(path, loss_curve_png(history, evals, title))
