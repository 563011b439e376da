"""Pictures people would rather look at than read: loss curves of training runs, a sweep's trials."""

import io
import warnings
from pathlib import Path

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
    return _figure_png(fig)


def save_loss_curve(path, history: pd.DataFrame, evals: pd.DataFrame, title: str) -> None:
    write_bytes(path, loss_curve_png(history, evals, title))


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def save_study_plots(study, folder: Path) -> list[Path]:
    """Optuna's pictures of a sweep, as PNG files; a picture the study cannot support yet is left out."""
    import optuna.visualization.matplotlib as views  # only sweeps need it; keep the stages light

    pictures = {
        "history.png": views.plot_optimization_history,
        "intermediate.png": views.plot_intermediate_values,
        "parallel.png": views.plot_parallel_coordinate,
        "importances.png": views.plot_param_importances,
    }
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        for name, plot in pictures.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of < 2 finished trials
                print(f"{name} left out: {e}")
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(9, 5)
            write_bytes(folder / name, _figure_png(figure))
            saved.append(folder / name)
    return saved
