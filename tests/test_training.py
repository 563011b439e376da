import itertools
import random
import signal

import numpy as np
import pytest
import torch

from pipeline.checkpoint import TrainingCheckpoints, load_resume_point
from pipeline.device import autocast, cpu_supports_bf16, pick_device, to_device, uses_bf16, uses_compile
from pipeline.errors import Diverged, PipelineError, Stopped
from pipeline.model import build_model
from pipeline.sampling import generate
from pipeline.stages import train as train_stage
from pipeline.training import (
    TrainCallbacks,
    eval_tokens,
    fixed_batches,
    rng_state,
    seed_everything,
    set_rng_state,
    train,
)

from .helpers import tiny_params


def test_training_lowers_the_loss_and_evaluates_on_schedule(toy):
    params, _, dataset = toy
    seen = []
    result = train(
        build_model(params.model, dataset.vocab.size, params.train.seed),
        dataset,
        params=params.train,
        device=torch.device("cpu"),
        callbacks=TrainCallbacks(on_eval=seen.append),
        progress=False,
    )
    assert [e.step for e in seen] == [20, 40, 60] and result.evals == seen
    assert len(result.history) == 60 and result.steps == 60
    assert result.evals[-1].train_loss < result.history[0].train_loss
    assert result.tokens_per_sec > 0 and result.best_val_loss == min(e.val_loss for e in seen)


def test_same_seed_same_run_whatever_the_global_rng(toy):
    params, _, dataset = toy
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model = build_model(params.model, dataset.vocab.size, params.train.seed)
        runs.append(train(model, dataset, params=params.train, device=torch.device("cpu"), progress=False))
    assert [h.train_loss for h in runs[0].history] == [h.train_loss for h in runs[1].history]
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)


def test_another_seed_another_run(toy):
    params, _, dataset = toy
    other = tiny_params("toy", "toy.train.seed=7")
    first, second = (build_model(p.model, dataset.vocab.size, p.train.seed) for p in (params, other))
    assert not torch.equal(first.lm_head.weight, second.lm_head.weight)


def test_a_diverging_run_stops_with_the_step(toy):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(PipelineError, match="diverged.*step 1"):
        train(model, dataset, params=params.train, device=torch.device("cpu"), progress=False)


def test_auto_device_is_usable_and_an_absent_cuda_is_named():
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="CUDA is not available"):
            pick_device("cuda")


def test_auto_settings_use_bf16_on_cuda_and_bf16_cpus_and_compile_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16(cuda, "auto") and uses_bf16(cpu, "auto") == cpu_supports_bf16() and uses_bf16(cpu, "bfloat16")
    assert not uses_bf16(cpu, "float32")
    assert not uses_bf16(cuda, "float32")
    assert uses_compile(cuda, "auto") and not uses_compile(cpu, "auto") and uses_compile(cpu, True)
    assert not uses_compile(cuda, False)


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # only the device's type is read: no GPU needed
def test_evaluation_batches_cover_every_training_sized_batch_in_the_devices_size(toy, device):
    params, _, dataset = toy
    p = tiny_params("toy", "toy.train.batch_size=300", "toy.train.eval_batches=20").train
    batches = fixed_batches(dataset, "val", p, 8, 1, torch.device(device))
    assert sum(len(x) for x, _ in batches) == 300 * 20
    assert {x.numel() for x, _ in batches[:-1]} == {eval_tokens(torch.device(device))}
    assert eval_tokens(torch.device("cpu")) < eval_tokens(torch.device("cuda"))
    x, y = batches[0]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_threads_apply_while_training_and_are_restored_after(toy):
    params, _, dataset = toy
    before, seen = torch.get_num_threads(), []
    p = tiny_params("toy", "toy.train.threads=1", "toy.train.max_steps=10").train
    train(
        build_model(params.model, dataset.vocab.size, params.train.seed),
        dataset,
        params=p,
        device=torch.device("cpu"),
        callbacks=TrainCallbacks(on_step=lambda r: seen.append(torch.get_num_threads())),
        progress=False,
    )
    assert seen == [1] * 10 and torch.get_num_threads() == before


def test_a_compiled_run_learns_repeats_bit_identically_and_saves_plain_weights(toy):
    """Compiling changes the kernels, not the run: same seed, same losses; keys without `_orig_mod.`."""
    params, _, dataset = toy
    p = tiny_params("toy", "toy.train.compile=true", "toy.train.max_steps=30", "toy.train.eval_interval=30").train
    cpu = torch.device("cpu")
    runs = [
        train(
            build_model(params.model, dataset.vocab.size, params.train.seed),
            dataset,
            params=p,
            device=cpu,
            progress=False,
        )
        for _ in range(2)
    ]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert [h.train_loss for h in runs[0].history] == [h.train_loss for h in runs[1].history]
    assert runs[0].evals[-1].train_loss < runs[0].history[0].train_loss
    keys = set(runs[0].model.state_dict())
    assert keys == set(build_model(params.model, dataset.vocab.size, params.train.seed).state_dict())
    assert not any("_orig_mod" in k for k in keys)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: covers the GPU path where one exists")


@CUDA
def test_cuda_training_uses_bf16_autocast_fused_adamw_tf32_and_compile(toy):
    params, _, dataset = toy
    torch._dynamo.reset()
    result = train(
        build_model(params.model, dataset.vocab.size, params.train.seed),
        dataset,
        params=params.train,
        device=torch.device("cuda"),
        progress=False,
    )
    adamw = getattr(result.optimizer, "optimizers", {"adamw": result.optimizer})["adamw"]  # beside Muon, or alone
    assert adamw.defaults["fused"] is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # `auto` compiles on CUDA
    assert next(result.model.parameters()).device.type == "cuda"
    assert not any("_orig_mod" in k for k in result.model.state_dict())
    assert result.evals[-1].train_loss < result.history[0].train_loss


@CUDA
def test_cuda_graphs_train_as_the_default_compile_does(toy):
    """compile_mode reduce-overhead replays CUDA graphs: the same run, step for step, up to other kernels' rounding."""
    params, _, dataset = toy
    runs = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        settings = (f"toy.train.compile_mode={mode}", "toy.train.device=cuda", "toy.train.max_steps=40")
        p = tiny_params("toy", *settings).train
        model = build_model(params.model, dataset.vocab.size, params.train.seed)
        runs[mode] = train(model, dataset, params=p, device=torch.device("cuda"), progress=False)
    default, graphs = ([h.train_loss for h in run.history] for run in runs.values())
    assert graphs[-1] < graphs[0]
    assert graphs == pytest.approx(default, rel=0.02)
    assert not any("_orig_mod" in k for k in runs["reduce-overhead"].model.state_dict())


@CUDA
def test_batches_reach_the_gpu_through_pinned_memory():
    tokens = torch.arange(12).view(3, 4)[:, 1:]  # a strided view, as a batch is
    moved = to_device(tokens, torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), tokens)


@CUDA
def test_attention_runs_on_the_flash_kernel_in_bf16(toy):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed).cuda()
    idx = torch.randint(dataset.vocab.size, (4, params.model.block_size), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(torch.device("cuda"), "auto"):
        _, loss = model(idx, idx)  # raises if the flash kernel cannot take these inputs
    loss.backward()
    assert model.lm_head.weight.grad is not None


@CUDA
def test_cached_sampling_on_cuda_gives_the_same_tokens(toy):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed).cuda().eval()
    start = torch.zeros(3, 1, dtype=torch.long, device="cuda")
    outs = [generate(model, start, 12, 0.0, None, None, use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(outs[0], outs[1])


def saver(folder, model, dataset) -> TrainingCheckpoints:
    return TrainingCheckpoints(folder / "latest.pt", folder / "best.pt", model, dataset.vocab, "fingerprint", "run")


def stop_before(step: int):
    """A stop request that comes just before `step`, as SIGINT would."""
    calls = itertools.count(1)
    return lambda: Stopped("stopped by test", signal.SIGINT) if next(calls) >= step else None


MODERN_RECIPE = [
    "toy.model.positions=rotary",
    "toy.model.norm=rmsnorm",
    "toy.model.qk_norm=true",
    "toy.model.mlp=relu2",
    "toy.model.tie_embeddings=false",
    "toy.train.optimizer=muon",
    "toy.train.schedule=wsd",
    "toy.train.sampling=random",  # the toy's own reads its passes in order
]


@pytest.mark.parametrize("recipe", [[], MODERN_RECIPE], ids=["classic", "modern"])
def test_a_stopped_run_resumed_from_its_checkpoint_is_the_uninterrupted_run(toy, tmp_path, recipe):
    _, _, dataset = toy
    params, cpu = tiny_params("toy", "toy.model.dropout=0.1", *recipe), torch.device("cpu")  # dropout: the RNG counts
    whole = train(
        build_model(params.model, dataset.vocab.size, params.train.seed),
        dataset,
        params=params.train,
        device=cpu,
        progress=False,
    )

    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    saved = saver(tmp_path, model, dataset)
    with pytest.raises(Stopped):
        callbacks = TrainCallbacks(on_checkpoint=saved.save, stop=stop_before(31))
        train(model, dataset, params=params.train, device=cpu, progress=False, callbacks=callbacks)
    point = load_resume_point(tmp_path / "latest.pt")
    assert point.state.step == 30 and [e.step for e in point.state.evals] == [20]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 20

    resumed_model = build_model(params.model, dataset.vocab.size, params.train.seed)
    resumed_model.load_state_dict(point.model_state)
    resumed = train(resumed_model, dataset, params=params.train, device=cpu, progress=False, resume=point.state)
    assert resumed.evals == whole.evals
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in whole.history]
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_nan_injected_mid_run_stops_at_that_step_and_keeps_the_last_good_checkpoint(toy, tmp_path):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed)

    def poison_after_step_25(record):
        if record.step == 25:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    saved = saver(tmp_path, model, dataset)
    with pytest.raises(Diverged, match="training diverged: loss is nan at step 26") as error:
        callbacks = TrainCallbacks(on_step=poison_after_step_25, on_checkpoint=saved.save)
        train(model, dataset, params=params.train, device=torch.device("cpu"), callbacks=callbacks, progress=False)
    assert error.value.step == 26
    point = load_resume_point(tmp_path / "latest.pt")
    assert point.state.step == 20
    assert all(torch.isfinite(t).all() for t in point.model_state.values())
    assert not list(tmp_path.glob(".*.tmp"))


def test_rng_states_round_trip_through_a_safe_load(tmp_path):
    seed_everything(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_a_diverging_training_names_the_step_and_the_checkpoint_kept_and_fails_its_run(toy, tracker, monkeypatch):
    params, paths, _ = toy
    build = train_stage.build_model

    def build_with_nan_after_25_steps(*args):
        """Fault injection: from the 26th training forward pass on, the logits are NaN."""
        model = build(*args)
        passes = itertools.count(1)
        model.lm_head.register_forward_hook(
            lambda module, inputs, out: out * float("nan") if module.training and next(passes) > 25 else None
        )
        return model

    monkeypatch.setattr(train_stage, "build_model", build_with_nan_after_25_steps)
    with pytest.raises(Diverged) as error:
        train_stage.train_example(params, paths, tracker, progress=False)
    assert str(error.value) == (
        f"toy: training diverged: loss is nan at step 26; the last good checkpoint, step 20, "
        f"stays in {paths.latest_checkpoint}"
    )
    point = load_resume_point(paths.latest_checkpoint)
    assert point.state.step == 20 and all(torch.isfinite(t).all() for t in point.model_state.values())
    run = tracker.client.get_run(point.run_id)
    assert run.info.status == "FAILED"
    assert len(tracker.client.get_metric_history(point.run_id, "train_loss")) == 25  # the curve up to the blow-up
    assert not paths.checkpoint.exists()
