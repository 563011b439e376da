import pytest
import torch

from pipeline.device import cpu_supports_bf16, newton_schulz_dtype, resolved_precision
from pipeline.model import build_model
from pipeline.optim import Muon, Optimizers, learning_rate_at, make_optimizer, orthogonalize, set_learning_rate

from .helpers import tiny_params


def recipe(**overrides):
    keys = [f"toy.train.{k}={v}" for k, v in overrides.items()]
    return tiny_params("toy", *keys)


def schedule(**overrides):
    return recipe(**overrides).train


def test_warm_up_is_linear_then_cosine_decays_to_min_lr():
    p = schedule(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    assert learning_rate_at(0, p) == pytest.approx(1e-4)
    assert learning_rate_at(4, p) == pytest.approx(5e-4)
    assert learning_rate_at(10, p) == pytest.approx(1e-3)
    assert learning_rate_at(55, p) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate_at(100, p) == pytest.approx(1e-4)
    assert learning_rate_at(500, p) == pytest.approx(1e-4)
    decay = [learning_rate_at(s, p) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_no_warm_up_starts_at_the_peak():
    p = schedule(max_steps=50, warmup_steps=0, learning_rate=2e-3, min_lr=0)
    assert learning_rate_at(0, p) == pytest.approx(2e-3)


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly_over_the_cooldown():
    p = schedule(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4, schedule="wsd", cooldown_fraction=0.2)
    assert learning_rate_at(5, p) == pytest.approx(6e-4)
    assert [learning_rate_at(s, p) for s in (10, 50, 80)] == pytest.approx([1e-3] * 3)
    assert learning_rate_at(90, p) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate_at(100, p) == pytest.approx(1e-4)


def test_adamw_alone_updates_every_parameter_at_the_scheduled_rate(toy):
    _, _, dataset = toy
    params = recipe(optimizer="adamw")
    model = build_model(params.model, dataset.vocab.size, 0)
    optimizer = make_optimizer(model, params.train, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    set_learning_rate(optimizer, 1e-3)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_each_once(toy):
    _, _, dataset = toy
    params = recipe(optimizer="muon", learning_rate=2e-3, muon_lr=0.03)
    model = build_model(params.model, dataset.vocab.size, 0)
    optimizer = make_optimizer(model, params.train, torch.device("cpu"))
    assert isinstance(optimizer, Optimizers) and isinstance(optimizer.optimizers["muon"], Muon)
    muon = {id(p) for g in optimizer.optimizers["muon"].param_groups for p in g["params"]}
    adamw = [id(p) for g in optimizer.optimizers["adamw"].param_groups for p in g["params"]]
    assert muon == {id(p) for p in model.hidden_matrices()} and not muon & set(adamw)
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    set_learning_rate(optimizer, 1e-3)  # half the peak: Muon's rate halves too
    assert optimizer.optimizers["muon"].param_groups[0]["lr"] == pytest.approx(0.015)


def test_muon_state_round_trips_through_a_safe_load(toy, tmp_path):
    _, _, dataset = toy
    params = recipe(optimizer="muon")
    model = build_model(params.model, dataset.vocab.size, 0)
    optimizer = make_optimizer(model, params.train, torch.device("cpu"))
    x = torch.randint(dataset.vocab.size, (4, params.model.block_size))
    model(x, x)[1].backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    again = make_optimizer(model, params.train, torch.device("cpu"))
    again.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    momentum = [again.optimizers["muon"].state[p]["momentum_buffer"] for p in model.hidden_matrices()]
    assert all(m.abs().sum() > 0 for m in momentum)
    with pytest.raises(ValueError, match="optimizer state for"):
        again.load_state_dict({"adamw": again.optimizers["adamw"].state_dict()})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optimizer", "sgd", "optimizer"),
        ("schedule", "linear", "schedule"),
        ("muon_lr", 0, "muon_lr"),
        ("cooldown_fraction", 1.5, "cooldown_fraction"),
    ],
)
def test_a_bad_optimizer_setting_is_named(key, value, message):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=message):
        recipe(**{key: value})


# the blocks' matrices of a model 32 wide: attention's qkv (96x32), its projection (32x32), the MLP's
# (128x32 and, transposed, 32x128); uneven values so that a transposition gone wrong shows
SHAPES = [(96, 32), (32, 32), (128, 32), (32, 128)] * 2


def muon_deltas(optimizer_class, steps: int = 3, **options) -> list[torch.Tensor]:
    """How far each matrix of SHAPES moved in `steps` steps of the same random gradients."""
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02) for shape in SHAPES]
    start = [m.detach().clone() for m in matrices]
    optimizer = optimizer_class(
        matrices, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw", **options
    )
    for _ in range(steps):
        for m in matrices:
            m.grad = torch.randn(m.shape, generator=generator)
        optimizer.step()
    return [m.detach() - s for m, s in zip(matrices, start)]


def relative_error(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_makes_torch_muons_update(dtype):
    # torch's orthogonalises in bf16 always: float32 here differs from it by bf16's rounding only
    assert relative_error(muon_deltas(Muon, dtype=dtype), muon_deltas(torch.optim.Muon)) < 0.02


@pytest.fixture
def orthogonalized_stacks(monkeypatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of every stack Muon orthogonalises while the test runs."""
    stacks = []

    def recording(stack, *args):
        stacks.append((tuple(stack.shape), stack.dtype))
        return orthogonalize(stack, *args)

    monkeypatch.setattr("pipeline.optim.orthogonalize", recording)
    return stacks


def test_muon_orthogonalises_each_shape_in_one_batched_product_at_the_chosen_dtype(orthogonalized_stacks):
    muon_deltas(Muon, steps=1, dtype=torch.float32)
    # the MLP's output projection joins its input projection's stack, transposed
    expected = [((2, 32, 32), torch.float32), ((2, 32, 96), torch.float32), ((4, 32, 128), torch.float32)]
    assert sorted(orthogonalized_stacks) == expected


def test_a_matrix_of_row_blocks_moves_as_its_blocks_would_apart():
    """Attention's q, k and v in one (96, 32) weight: each block's update is that of a (32, 32) matrix."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(96, 32, generator=generator) * 0.02
    qkv, whole = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    apart = [torch.nn.Parameter(block.clone()) for block in start.split(32)]
    options = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    optimizers = [Muon([qkv], **options, row_blocks={qkv: 3}), Muon(apart, **options), Muon([whole], **options)]
    for _ in range(3):
        grad = torch.randn(96, 32, generator=generator)
        qkv.grad, whole.grad = grad.clone(), grad.clone()
        for matrix, block in zip(apart, grad.split(32)):
            matrix.grad = block.clone()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(qkv.detach(), torch.cat([m.detach() for m in apart]), rtol=1e-5, atol=1e-6)
    assert (qkv - whole).norm() > 0.1 * (whole - start).norm()  # not as one (96, 32) matrix moves


def test_the_models_q_k_and_v_join_the_square_stack(orthogonalized_stacks, toy):
    _, _, dataset = toy
    params = recipe(optimizer="muon")  # 1 block, 32 wide
    model = build_model(params.model, dataset.vocab.size, 0)
    optimizer = make_optimizer(model, params.train, torch.device("cpu"))
    x = torch.randint(dataset.vocab.size, (4, params.model.block_size))
    model(x, x)[1].backward()
    optimizer.step()
    shapes = sorted(shape for shape, _ in orthogonalized_stacks)
    assert shapes == [(2, 32, 128), (4, 32, 32)]  # q, k, v and the projection; the MLP's two


def test_orthogonalize_brings_every_singular_value_near_one():
    generator = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 16, 48, generator=generator) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    singular = torch.linalg.svdvals(orthogonalize(stack))
    assert singular.min() > 0.5 and singular.max() < 1.3  # Keller Jordan's quintic: about U·Vᵀ


def test_newton_schulz_runs_in_bf16_only_where_bf16_is_native_and_not_pinned_to_float32(toy):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native_cpu = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    assert newton_schulz_dtype(cpu, "auto") == newton_schulz_dtype(cpu, "bfloat16") == native_cpu
    assert newton_schulz_dtype(cuda, "auto") == newton_schulz_dtype(cuda, "bfloat16") == torch.bfloat16
    assert newton_schulz_dtype(cuda, "float32") == newton_schulz_dtype(cpu, "float32") == torch.float32
    _, _, dataset = toy
    params = recipe(optimizer="muon", precision="auto")
    optimizer = make_optimizer(build_model(params.model, dataset.vocab.size, 0), params.train, cpu)
    assert optimizer.optimizers["muon"].dtype == native_cpu
    assert resolved_precision(cpu, "float32") == {
        "resolved.autocast_dtype": "float32",
        "resolved.newton_schulz_dtype": "float32",
    }


def test_a_compiled_muon_step_takes_a_new_learning_rate_without_recompiling():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of graphs compiled by earlier tests
    runs = []
    for compile in (False, True):
        generator = torch.Generator().manual_seed(0)
        matrices = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES[:4]]
        optimizer = Muon(matrices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", compile=compile)
        for lr in (0.02, 0.01, 0.005):  # the schedule's changing rate reaches the step as a tensor
            for m in matrices:
                m.grad = torch.randn(m.shape, generator=generator)
            optimizer.param_groups[0]["lr"] = lr
            optimizer.step()
        runs.append(matrices)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # one graph per stack, compiled once
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_torch_muons_state_resumes_with_its_momentum(toy, tmp_path):
    _, _, dataset = toy
    params = recipe(optimizer="muon")
    model = build_model(params.model, dataset.vocab.size, 0)
    x = torch.randint(dataset.vocab.size, (4, params.model.block_size))
    model(x, x)[1].backward()
    current = make_optimizer(model, params.train, torch.device("cpu"))
    old = Optimizers(
        adamw=current.optimizers["adamw"],
        muon=torch.optim.Muon(model.hidden_matrices(), adjust_lr_fn="match_rms_adamw"),
    )
    old.optimizers["muon"].param_groups[0]["lr_scale"] = current.optimizers["muon"].param_groups[0]["lr_scale"]
    old.step()
    torch.save(old.state_dict(), tmp_path / "optimizer.pt")
    current.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for p in model.hidden_matrices():
        assert torch.equal(
            current.optimizers["muon"].state[p]["momentum_buffer"], old.optimizers["muon"].state[p]["momentum_buffer"]
        )
    assert current.optimizers["muon"].param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    current.step()  # and steps on from it
    assert all(torch.isfinite(p).all() for p in model.hidden_matrices())


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_the_lookup_tables_step_sparsely_on_the_cpu_at_their_own_rate(optimizer):
    """SparseAdam moves the rows a batch read and no other; the bigram and the n-gram tables each step at
    their own share of the schedule's rate."""
    scales = ["shakespeare.train.bigram_lr_scale=0.25", "shakespeare.train.ngram_lr_scale=0.125"]
    params = tiny_params("shakespeare", f"shakespeare.train.optimizer={optimizer}", *scales)
    model = build_model(params.model, 11, 0)
    optimizer_ = make_optimizer(model, params.train, torch.device("cpu"))
    lookups = optimizer_.optimizers["lookups"]
    assert isinstance(lookups, torch.optim.SparseAdam)
    bigram_group, ngram_group = lookups.param_groups
    assert bigram_group["params"] == [model.transformer.bte.weight]
    assert {id(p) for p in ngram_group["params"]} == {id(t.weight) for t in model.transformer.nte}
    lr = params.train.learning_rate  # before a step
    assert [g["lr"] for g in lookups.param_groups] == pytest.approx([0.25 * lr, 0.125 * lr])
    set_learning_rate(optimizer_, 1e-3)
    assert [g["lr"] for g in lookups.param_groups] == pytest.approx([2.5e-4, 1.25e-4])
    before = [t.weight.detach().clone() for t in model.lookup_tables()]
    idx = torch.randint(11, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(t.weight.grad.is_sparse for t in model.lookup_tables())
    optimizer_.step()
    bigram_rows = set(model.bigrams(idx).flatten().tolist())
    moved = (model.transformer.bte.weight != before[0]).any(dim=1).nonzero().flatten().tolist()
    assert set(moved) == bigram_rows
    for table, old, rows in zip(model.transformer.nte, before[1:], model.ngrams(idx)):
        assert set((table.weight != old).any(dim=1).nonzero().flatten().tolist()) == set(rows.flatten().tolist())


def test_compiled_the_lookup_tables_stay_dense_in_adam_and_a_missing_table_kind_has_no_group():
    """A compiled model cannot take sparse gradients: Adam steps the tables densely, at the same rates."""
    overrides = ["shakespeare.train.compile=true", "shakespeare.model.bigram_embedding=false"]
    params = tiny_params("shakespeare", "shakespeare.train.ngram_lr_scale=0.125", *overrides)
    model = build_model(params.model, 11, 0)
    lookups = make_optimizer(model, params.train, torch.device("cpu")).optimizers["lookups"]
    assert type(lookups) is torch.optim.Adam and not any(t.sparse for t in model.lookup_tables())
    (group,) = lookups.param_groups
    assert {id(p) for p in group["params"]} == {id(t.weight) for t in model.transformer.nte}
    assert group["lr"] == pytest.approx(0.125 * params.train.learning_rate)
