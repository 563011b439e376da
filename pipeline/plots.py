"""Pictures people would rather look at than read: loss curves, next-character probabilities,
attention maps."""

import io

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
    return png_bytes(fig)


def save_loss_curve(path, history: pd.DataFrame, evals: pd.DataFrame, title: str) -> None:
    write_bytes(path, loss_curve_png(history, evals, title))


# DejaVu Sans, matplotlib's font, has no ␠: an open box stands for the space
GLYPHS = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def glyphs(text: str) -> str:
    return "".join(GLYPHS.get(ch, ch) for ch in text)


def png_bytes(fig) -> bytes:
    """The figure as PNG; cropped to its contents unless its layout already fits them (a second
    drawing of every text otherwise, the slowest part of a picture with many labels)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches=None if fig.get_layout_engine() else "tight")
    plt.close(fig)
    return buffer.getvalue()


def next_char_heatmap_png(probs, prefixes: list[str], chars: list[str], title: str) -> bytes:
    """Positions × vocabulary: after each prefix (a row), the probability of each next character.

    Cells of 5 % and more carry their percentage, so a small vocabulary reads at a glance.
    """
    probs = np.asarray(probs)
    rows, cols = probs.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.3 * cols, 1.5 + 0.35 * rows), dpi=100)
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), [glyphs(c) for c in chars])
    ax.set_yticks(range(rows), [glyphs(p) for p in prefixes])
    for (row, col), p in np.ndenumerate(probs):
        if p >= 0.05:
            color = "white" if p > 0.6 else "black"
            ax.text(col, row, f"{100 * p:.0f}", ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="next character (cell: probability in %)", ylabel="text so far", title=title)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="probability")
    return png_bytes(fig)


def attention_maps_png(weights, chars: str, title: str) -> bytes:
    """One heatmap per layer (rows) and head (columns): how much each position attends to each earlier one."""
    weights = np.asarray(weights)
    n_layer, n_head, T, _ = weights.shape
    side = max(2.2, 0.8 + 0.18 * T)
    size = (side * n_head + 1, side * n_layer + 0.8)
    fig, axes = plt.subplots(n_layer, n_head, figsize=size, dpi=100, squeeze=False, layout="constrained")
    labels = [glyphs(c) for c in chars]
    for (layer, head), ax in np.ndenumerate(axes):  # characters along the outer edges only, as on a shared axis
        image = ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
        bottom, left = layer == n_layer - 1, head == 0
        ax.set_xticks(range(T) if bottom else [], labels if bottom else [], fontsize=7)
        ax.set_yticks(range(T) if left else [], labels if left else [], fontsize=7)
        ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
    fig.supxlabel("attended-to character (key)")
    fig.supylabel("attending character (query)")
    fig.suptitle(title)
    fig.colorbar(image, ax=axes, fraction=0.02, pad=0.02, label="attention weight")
    return png_bytes(fig)
