"""The one training loop: the train stage, the sweeps and the tests all call `train()`."""

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data import Dataset, pass_batch, random_batch, whole_passes
from pipeline.device import autocast, cpu_threads, setup_device, to_device, uses_compile
from pipeline.errors import Diverged
from pipeline.model import GPT
from pipeline.optim import Optimizers, learning_rate_at, make_optimizer, set_learning_rate
from pipeline.records import EvalRecord, StepRecord, TrainState
from pipeline.schema import TrainParams


@dataclasses.dataclass
class TrainResult:
    model: GPT
    optimizer: torch.optim.Optimizer | Optimizers
    history: list[StepRecord]
    evals: list[EvalRecord]
    seconds: float

    @property
    def steps(self) -> int:
        return self.history[-1].step if self.history else 0

    @property
    def best_val_loss(self) -> float:
        return min(e.val_loss for e in self.evals)

    @property
    def tokens_per_sec(self) -> float:
        """Mean training throughput, leaving out the first step's warm-up."""
        rates = [h.tokens_per_sec for h in self.history[1:]] or [h.tokens_per_sec for h in self.history]
        return float(np.mean(rates))


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


def compiled(model: GPT, mode: str):
    """`model` under torch.compile in `mode` (TrainParams.compile_mode); the wrapper shares its parameters."""
    return torch.compile(model, mode=None if mode == "default" else mode)


@contextlib.contextmanager
def deterministic(enabled: bool):
    """Deterministic algorithms while `enabled`: compiled CPU code then sums embedding gradients
    in a fixed order (eager scatter) instead of with atomic adds, so same-seed runs stay identical."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states as tensors and plain values, which `torch.load(weights_only=True)` reads."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state,
        "python": {"version": version, "state": list(internal), "gauss": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def eval_tokens(device: torch.device) -> int:
    """Tokens per forward pass when evaluating, without gradients. A GPU wants large batches; on 2
    cores without bf16 (AVX2) 4,096 tokens ran 1.7x faster than 16,384, whose activations spill out
    of the caches (docs/performance.md; not measured on a bf16 CPU)."""
    return 4_096 if device.type == "cpu" else 32_768


def fixed_batches(dataset: Dataset, split: str, params: TrainParams, block_size: int, seed: int, device) -> list:
    """The same evaluation windows at every evaluation, so the curve is not sampling noise.

    `eval_batches` training-sized batches, regrouped into batches of `eval_tokens(device)`.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens, starts = getattr(dataset, split), dataset.window_starts(split, block_size)
    x, y = random_batch(tokens, params.batch_size * params.eval_batches, block_size, generator, starts)
    rows = max(1, eval_tokens(device) // block_size)
    return list(zip(x.split(rows), y.split(rows)))


def batch_source(dataset: Dataset, params: TrainParams, block_size: int, generator: torch.Generator) -> Callable:
    """The training batch of each step: windows at random, or the word stream's passes in order."""
    if params.sampling == "passes":
        passes = whole_passes(dataset, block_size)
        return lambda step: pass_batch(dataset.train, passes, params.batch_size, block_size, step)
    starts = dataset.window_starts("train", block_size)
    return lambda step: random_batch(dataset.train, params.batch_size, block_size, generator, starts)


@torch.no_grad()
def mean_loss(model: GPT, batches: list, device: torch.device, precision: str) -> float:
    """Mean next-token loss over every window of `batches`."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(device, precision):
            _, loss = model(to_device(x, device), to_device(y, device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


@dataclasses.dataclass
class TrainCallbacks:
    """What the caller hears of a run, all optional.

    `on_eval` sees every evaluation (a sweep reports it to its pruner and may raise to stop).
    `on_checkpoint(state, best)` comes before the first step and after every evaluation (`best`:
    the lowest validation loss so far). `stop` is asked between steps; when it returns an
    exception, the state is checkpointed and the exception raised.
    """

    on_step: Callable[[StepRecord], None] | None = None
    on_eval: Callable[[EvalRecord], None] | None = None
    on_checkpoint: Callable[[TrainState, bool], None] | None = None
    stop: Callable[[], BaseException | None] | None = None


def train(
    model: GPT,
    dataset: Dataset,
    *,
    params: TrainParams,
    device: torch.device,
    callbacks: TrainCallbacks | None = None,
    progress: bool = True,
    resume: TrainState | None = None,
) -> TrainResult:
    """Train `model` for `params.max_steps` steps, evaluating every `params.eval_interval`.

    `resume` continues a run from its saved state, the model holding that state's weights,
    exactly as if it had never stopped.
    """
    compiled_on_cpu = device.type == "cpu" and uses_compile(device, params.compile)
    with cpu_threads(params.threads), deterministic(compiled_on_cpu):
        return _train(model, dataset, params, device, callbacks or TrainCallbacks(), progress, resume)


def _train(model, dataset, params, device, callbacks: TrainCallbacks, progress, resume) -> TrainResult:
    seed_everything(params.seed)
    setup_device(device)
    block_size = model.config.block_size
    model.to(device).train()
    # the compiled wrapper shares the parameters: `model` stays the module to save and evaluate
    compiles = uses_compile(device, params.compile)
    forward = compiled(model, params.compile_mode) if compiles else model
    graphs = compiles and device.type == "cuda" and params.compile_mode in CUDA_GRAPH_MODES
    optimizer = make_optimizer(model, params, device)
    generator = torch.Generator().manual_seed(params.seed)
    eval_seed = params.seed + 1
    eval_sets = [fixed_batches(dataset, split, params, block_size, eval_seed, device) for split in ("train", "val")]
    next_batch = batch_source(dataset, params, block_size, generator)
    history, evals, start = [], [], 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.sampler)
        set_rng_state(resume.rng)
        history, evals, start = list(resume.history), list(resume.evals), resume.step
    started = time.perf_counter() - (resume.seconds if resume else 0.0)

    def checkpoint(step: int, best: bool) -> None:
        if callbacks.on_checkpoint:
            seconds = time.perf_counter() - started
            callbacks.on_checkpoint(
                TrainState(step, optimizer.state_dict(), generator.get_state(), rng_state(), history, evals, seconds),
                best,
            )

    def evaluate(step: int) -> None:
        train_loss, val_loss = (mean_loss(model, batches, device, params.precision) for batches in eval_sets)
        if not math.isfinite(val_loss):
            raise Diverged(f"training diverged: validation loss is {val_loss} at step {step}", step)
        best = not evals or val_loss < min(e.val_loss for e in evals)
        evals.append(EvalRecord(step, train_loss, val_loss))
        if progress:
            tqdm.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if callbacks.on_eval:
            callbacks.on_eval(evals[-1])
        checkpoint(step, best)

    # disable=None: a bar on a terminal, none in a log file
    steps = range(start + 1, params.max_steps + 1)
    bar = tqdm(
        steps, initial=start, total=params.max_steps, desc="train", unit="step", disable=None if progress else True
    )
    if start == 0:
        checkpoint(0, best=False)  # from the first step on, a killed run has a checkpoint to resume from
    for step in bar:
        if callbacks.stop and (reason := callbacks.stop()) is not None:
            checkpoint(step - 1, best=False)
            raise reason
        tick = time.perf_counter()
        lr = learning_rate_at(step - 1, params)
        set_learning_rate(optimizer, lr)
        x, y = next_batch(step)
        if graphs:  # a new step: the graphs may reuse the memory of the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, params.precision):
            _, loss = forward(to_device(x, device), to_device(y, device))
        loss_value = loss.item()
        if not math.isfinite(loss_value):  # stop before the update, so the weights stay finite
            raise Diverged(f"training diverged: loss is {loss_value} at step {step}", step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.dense_parameters(), params.grad_clip)
        optimizer.step()
        if device.type == "cuda":  # count the step's queued GPU work in its own time, not in the next step's
            torch.cuda.synchronize(device)
        record = StepRecord(step, loss_value, lr, x.numel() / (time.perf_counter() - tick))
        history.append(record)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{record.tokens_per_sec:,.0f}", refresh=False)
        if callbacks.on_step:
            callbacks.on_step(record)
        if step % params.eval_interval == 0 or step == params.max_steps:
            evaluate(step)
    bar.close()
    return TrainResult(model, optimizer, history, evals, time.perf_counter() - started)
