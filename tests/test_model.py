import pytest
import torch
from pydantic import ValidationError

from pipeline.model import GPT, GPTConfig, KVCache


def config(**overrides) -> GPTConfig:
    values = dict(block_size=16, vocab_size=11, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False)
    return GPTConfig(**(values | overrides))


def test_logits_have_one_row_per_position_and_token():
    model = GPT(config())
    idx = torch.randint(11, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 11)
    assert loss.ndim == 0 and loss.item() > 0


def test_a_future_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = GPT(config()).eval()
    idx = torch.randint(11, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 11
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[0, :7], after[0, :7])
    assert not torch.allclose(before[0, 7:], after[0, 7:])


@pytest.mark.parametrize("n_layer", [1, 2, 5])
def test_n_layer_really_adds_blocks(n_layer):
    one, many = GPT(config(n_layer=1)), GPT(config(n_layer=n_layer))
    assert len(many.transformer.h) == n_layer
    per_block = sum(p.numel() for p in one.transformer.h[0].parameters())
    assert many.num_params() - one.num_params() == (n_layer - 1) * per_block


def test_embedding_and_head_share_weights():
    model = GPT(config())
    assert model.transformer.wte.weight is model.lm_head.weight


def test_bias_switch_adds_biases_to_linear_and_norm_layers():
    without, with_bias = GPT(config(bias=False)), GPT(config(bias=True))
    assert all(m.bias is None for m in without.modules() if isinstance(m, torch.nn.LayerNorm))
    assert with_bias.num_params() > without.num_params()


def test_optimizer_groups_decay_matrices_only_and_cover_every_parameter_once():
    model = GPT(config())
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_longer_input_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(config(block_size=4))(torch.zeros(1, 5, dtype=torch.long))


def test_generate_extends_each_sequence_and_crops_context_to_block_size():
    model = GPT(config(block_size=4))
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=6, top_k=3)
    assert out.shape == (2, 9)
    assert torch.equal(out[:, :3], torch.zeros(2, 3, dtype=torch.long))


def test_top_k_one_and_temperature_zero_are_both_greedy():
    torch.manual_seed(1)
    model = GPT(config()).eval()
    start = torch.randint(11, (2, 3))
    assert torch.equal(model.generate(start, 5, temperature=0), model.generate(start, 5, temperature=1.3, top_k=1))


def test_top_k_keeps_only_the_k_likeliest_tokens():
    model = GPT(config()).eval()
    probs = model.next_token_probs(torch.randint(11, (4, 5)), top_k=3)
    assert ((probs > 0).sum(dim=-1) == 3).all()
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
        ({"n_layer": 0}, "greater than 0"),
        ({"block_size": -1}, "greater than 0"),
        ({"dropout": 1.0}, "less than 1"),
        ({"vocab_size": 0}, "greater than 0"),
    ],
)
def test_config_is_validated_on_creation(overrides, message):
    with pytest.raises(ValidationError, match=message):
        config(**overrides)


def test_cached_logits_match_the_full_forward_position_by_position():
    torch.manual_seed(2)
    model = GPT(config(block_size=12)).eval()
    idx = torch.randint(11, (3, 12))
    full, _ = model(idx)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 3)])
def test_generation_with_the_cache_gives_the_same_tokens_as_without(temperature, top_k):
    """Past block_size the window is cropped and recomputed, as the uncached path does."""
    torch.manual_seed(3)
    model = GPT(config(block_size=8)).eval()
    start = torch.randint(11, (4, 3))
    outs = [
        model.generate(start, 14, temperature, top_k, torch.Generator().manual_seed(5), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert outs[0].shape == (4, 17) and torch.equal(outs[0], outs[1])


def test_generation_feeds_one_new_token_per_step_while_the_cache_has_room():
    model = GPT(config(block_size=8)).eval()
    lengths = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: lengths.append(args[0].size(1)))
    model.generate(torch.zeros(2, 3, dtype=torch.long), 7)
    assert lengths == [3, 1, 1, 1, 1, 1, 8]  # the prompt, one token at a time, then the cropped window


def test_a_filled_cache_takes_one_token_at_a_time():
    model = GPT(config()).eval()
    cache = KVCache(model.config.n_layer, model.config.block_size)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="one token at a time"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    full = KVCache(model.config.n_layer, model.config.block_size)
    model(torch.zeros(1, 16, dtype=torch.long), cache=full)
    with pytest.raises(ValueError, match="length 17 exceeds block_size 16"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=full)
