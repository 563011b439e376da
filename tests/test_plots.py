import struct

import numpy as np
import pandas as pd

from pipeline.plots import attention_maps_png, glyphs, loss_curve_png, next_char_heatmap_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking it is one."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_space_and_newline_get_visible_glyphs():
    assert glyphs(" CO\nR") == "␣CO⏎R"


def test_next_char_heatmap_is_a_png_that_grows_with_the_vocabulary():
    probs = np.random.default_rng(0).dirichlet(np.ones(11), size=5)
    small = png_size(next_char_heatmap_png(probs, [" ", " C", " CO", " COR", " CORN"], list(" ACEILNORST"), "toy"))
    probs = np.random.default_rng(0).dirichlet(np.ones(65), size=20)
    large = png_size(next_char_heatmap_png(probs, [str(i) for i in range(20)], [chr(48 + i) for i in range(65)], "t"))
    assert 300 <= small[0] < large[0] <= 4000 and 200 <= small[1] < large[1] <= 4000


def test_attention_maps_have_one_panel_per_layer_and_head():
    weights = np.tril(np.ones((5, 5)))
    weights = np.broadcast_to(weights / weights.sum(-1, keepdims=True), (2, 4, 5, 5))
    two_by_four = png_size(attention_maps_png(weights, " CORN", "toy"))
    four_by_two = png_size(attention_maps_png(weights.reshape(4, 2, 5, 5), " CORN", "toy"))
    assert two_by_four[0] > two_by_four[1] and four_by_two[1] > four_by_two[0]
    assert all(200 <= side <= 4000 for side in two_by_four + four_by_two)


def test_loss_curve_is_a_png():
    history = pd.DataFrame({"step": [1, 2, 3], "train_loss": [3.0, 2.5, 2.0]})
    evals = pd.DataFrame({"step": [3], "val_loss": [2.2], "train_loss": [2.0]})
    width, height = png_size(loss_curve_png(history, evals, "toy"))
    assert 400 <= width <= 2000 and 250 <= height <= 1500
