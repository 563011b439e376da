import re
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_params
from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.inspection import (
    check_inspect_prompts,
    explicit_attention,
    format_table,
    forward_with_attention,
    inspect_prompt,
)
from pipeline.model import CLASSIC_BLOCK, GPT, GPTConfig
from pipeline.paths import ExamplePaths
from pipeline.run_info import load_run_id
from pipeline.sampling import next_token_probs
from pipeline.stages.inspect import file_stem, inspect_example

from .test_plots import png_size

VOCAB = Vocabulary.from_text(" ACEILNORST")


OPTIONS = [{}, {"bias": True}, {"positions": "rotary", "norm": "rmsnorm"}, {"positions": "rotary", "qk_norm": True}]


def sharp_model(**options) -> GPT:
    """A random model with large query/key weights, so its attention is far from uniform."""
    torch.manual_seed(0)
    shape = dict(block_size=8, vocab_size=VOCAB.size, n_layer=2, n_head=4, n_embd=32)
    config = GPTConfig(**shape | CLASSIC_BLOCK | options)
    model = GPT(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8)
    return model


@pytest.mark.parametrize("options", OPTIONS)
def test_explicit_attention_gives_the_fused_modules_output(options):
    model = sharp_model(**options)
    attn, (rope, _) = model.transformer.h[0].attn, model.position_inputs(0, 7, "cpu")
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        fused = attn(x, rope)
        explicit, weights = explicit_attention(attn, x, rope)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)
    assert weights.shape == (3, 4, 7, 7)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 4, 7))
    assert (weights.triu(diagonal=1) == 0).all(), "a position attends to a later one"
    if not options.get("qk_norm"):  # normalised queries and keys cannot be sharpened by scaling
        assert weights.max() > 0.9, "the test model's attention should be sharp"


@pytest.mark.parametrize("options", OPTIONS)
def test_the_explicit_path_gives_the_models_logits_and_leaves_no_hooks(options):
    model = sharp_model(**options)
    idx = torch.randint(VOCAB.size, (2, 8))
    with torch.no_grad():
        fused, _ = model(idx)
    logits, weights = forward_with_attention(model, idx)
    torch.testing.assert_close(logits, fused, atol=1e-5, rtol=1e-4)
    assert weights.shape == (2, 2, 4, 8, 8)
    assert not any(block.attn._forward_hooks for block in model.transformer.h)


def test_probability_rows_sum_to_one_and_end_with_the_next_token_distribution():
    model = sharp_model()
    inspection = inspect_prompt(model, VOCAB, "CORN", word_list=True, device="cpu")
    assert inspection.context == " CORN"
    assert inspection.probs.shape == (5, VOCAB.size) and inspection.attention.shape == (2, 4, 5, 5)
    torch.testing.assert_close(inspection.probs.sum(dim=-1), torch.ones(5))
    last = next_token_probs(model, torch.tensor([VOCAB.encode(" CORN")]))[0]
    torch.testing.assert_close(inspection.probs[-1], last, atol=1e-6, rtol=1e-5)
    assert inspection.prefixes() == [" ", " C", " CO", " COR", " CORN"]


def test_the_table_reads_like_the_seed_notebook():
    inspection = inspect_prompt(sharp_model(), VOCAB, "CORN", word_list=True, device="cpu")
    header, *rows = format_table(inspection, 3).splitlines()
    assert header == "prompt 'CORN', read as ' CORN'"
    assert [row.split(" -> ")[0] for row in rows] == ["␠", "C", "O", "R", "N"]
    for row, top in zip(rows, inspection.top(3)):
        entries = re.findall(r"'(.)':(\d+\.\d)%", row)
        assert len(entries) == 3 and [c for c, _ in entries] == [{" ": "␠"}.get(c, c) for c, _ in top], row
        percents = [float(p) for _, p in entries]
        assert percents == sorted(percents, reverse=True)
        assert percents[0] == pytest.approx(100 * top[0][1], abs=0.051)


def test_text_prompts_are_read_as_they_are():
    inspection = inspect_prompt(sharp_model(), VOCAB, "CAT", word_list=False, device="cpu")
    assert inspection.context == "CAT" and format_table(inspection, 1).startswith("prompt 'CAT'\nC -> '")


def test_bad_prompts_are_refused_with_their_problem():
    with pytest.raises(PipelineError, match=r"'cor' has 'c', 'o', 'r'"):
        check_inspect_prompts(VOCAB, ["COR", "cor"], 8, True)
    with pytest.raises(PipelineError, match=r"context of 8 characters after the word boundary: 'CORNCORN'"):
        check_inspect_prompts(VOCAB, ["CORNCORN"], 8, True)
    check_inspect_prompts(VOCAB, ["CORNCORN"], 8, False)


def test_file_stems_are_numbered_and_safe():
    assert file_stem(1, "CORN") == "1-CORN"
    assert file_stem(2, "ROMEO:\nI will") == "2-ROMEO_I_will"
    assert file_stem(3, "?!") == "3"


def test_the_inspect_stage_writes_the_reports_and_logs_them_to_the_models_run(trained_project, capsys, tmp_path):
    root, tracker = trained_project
    params, paths = load_params(root / "params.yaml")["toy"], ExamplePaths(root, "toy")
    (paths.reports / "stale.png").parent.mkdir(exist_ok=True)
    (paths.reports / "stale.png").write_bytes(b"old")
    table = inspect_example(params, paths, tracker)
    assert table in capsys.readouterr().out
    stems = [file_stem(n, p) for n, p in enumerate(params.inspect.prompts, 1)]
    pictures = {f"{stem}-{kind}.png" for stem in stems for kind in ("next-chars", "attention")}
    expected = {"next-chars.txt", "loss.png"} | pictures
    assert {p.name for p in paths.reports.iterdir()} == expected
    assert (paths.reports / "next-chars.txt").read_text() == table
    assert (paths.reports / "loss.png").read_bytes() == paths.loss_plot.read_bytes()
    for name in expected - {"next-chars.txt"}:
        width, height = png_size((paths.reports / name).read_bytes())
        assert 250 <= width <= 4000 and 200 <= height <= 4000, (name, width, height)
    run = tracker.client.get_run(load_run_id(paths.run_info, tracker))
    # MLflow cannot delete artifacts: the run keeps what earlier inspections (other tests) logged too
    logged = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "reports")}
    assert {f"reports/{name}" for name in expected} <= logged
    downloaded = tracker.client.download_artifacts(run.info.run_id, "reports/next-chars.txt", str(tmp_path))
    assert Path(downloaded).read_text() == table
    assert run.data.tags["inspect.top_k"] == str(params.inspect.top_k)
    assert run.info.status == "FINISHED"


def test_a_trained_toy_model_reads_its_words(trained_project):
    """Even the tiny model has learned where words end: after a whole word the boundary is likely."""
    root, _ = trained_project
    checkpoint = load_checkpoint(ExamplePaths(root, "toy").checkpoint)
    inspection = inspect_prompt(checkpoint.model, checkpoint.vocab, "CORN", word_list=True, device="cpu")
    torch.testing.assert_close(inspection.probs.sum(dim=-1), torch.ones(5))
    assert inspection.probs[-1, checkpoint.vocab.encode(" ")[0]] > 1 / checkpoint.vocab.size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_explicit_path_matches_the_fused_cuda_kernel():
    model = sharp_model().cuda()
    idx = torch.randint(VOCAB.size, (4, 8), device="cuda")
    with torch.no_grad():
        fused, _ = model(idx)
    logits, weights = forward_with_attention(model, idx)
    torch.testing.assert_close(logits, fused, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(4, 2, 4, 8, device="cuda"))


def test_a_prompt_past_the_context_is_refused_on_one_short_line():
    """A table and attention map per position of 100,000 characters is no picture: refused, named by its start."""
    with pytest.raises(PipelineError) as refused:
        check_inspect_prompts(VOCAB, ["CORN" * 25_000], 8, False)
    assert str(refused.value) == (
        f"prompts longer than the model's context of 8 characters: {'CORN' * 15!r}... (100,000 characters)"
    )
