import pytest
import torch
from pydantic import ValidationError

from pipeline.model import CLASSIC_BLOCK, GPT, GPTConfig
from pipeline.sampling import KVCache, generate, next_token_probs


def config(**overrides) -> GPTConfig:
    """nanoGPT's block unless `overrides` say otherwise."""
    values = dict(block_size=16, vocab_size=11, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False)
    return GPTConfig(**(values | CLASSIC_BLOCK | overrides))


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
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=6, top_k=3)
    assert out.shape == (2, 9)
    assert torch.equal(out[:, :3], torch.zeros(2, 3, dtype=torch.long))


def test_top_k_one_and_temperature_zero_are_both_greedy():
    torch.manual_seed(1)
    model = GPT(config()).eval()
    start = torch.randint(11, (2, 3))
    assert torch.equal(generate(model, start, 5, temperature=0), generate(model, start, 5, temperature=1.3, top_k=1))


def test_top_k_keeps_only_the_k_likeliest_tokens():
    model = GPT(config()).eval()
    probs = next_token_probs(model, torch.randint(11, (4, 5)), top_k=3)
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
    cache = KVCache(model.config.n_layer, keep=model.config.block_size)
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_generation_feeds_one_new_token_per_step_while_the_cache_has_room():
    model = GPT(config(block_size=8)).eval()
    lengths = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: lengths.append(args[0].size(1)))
    generate(model, torch.zeros(2, 3, dtype=torch.long), 7)
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


MODERN = dict(
    positions="rotary",
    norm="rmsnorm",
    qk_norm=True,
    mlp="relu2",
    tie_embeddings=False,
    logit_softcap=15.0,
    bigram_embedding=True,
)


def with_trained_ngram_rows(model: GPT) -> GPT:
    """A fresh model's n-gram rows are zero, which would leave their path out of a test: give them values."""
    with torch.no_grad():
        for table in getattr(model.transformer, "nte", []):
            table.weight.normal_(std=0.5)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {"positions": "rotary"},
        {"norm": "rmsnorm"},
        {"qk_norm": True},
        {"mlp": "relu2"},
        {"mlp": "swiglu"},
        {"tie_embeddings": False},
        {"logit_softcap": 10.0},
        {"bigram_embedding": True},
        {"ngram_rows": (13, 17)},
        MODERN,
    ],
)
def test_every_block_option_trains_causally_and_changes_the_model(overrides):
    torch.manual_seed(4)
    classic, model = GPT(config()).eval(), with_trained_ngram_rows(GPT(config(**overrides))).eval()
    idx = torch.randint(11, (2, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 11
    torch.testing.assert_close(model(idx)[0][0, :7], model(changed)[0][0, :7])
    torch.manual_seed(4)
    assert not torch.allclose(GPT(config()).eval()(idx)[0], model(idx)[0])
    _, loss = model.train()(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter the loss never reaches"
    assert classic.num_params() > 0


def test_rotary_positions_have_no_position_table_and_need_an_even_head_size():
    assert not hasattr(GPT(config(positions="rotary")).transformer, "wpe")
    with pytest.raises(ValidationError, match="even head size"):
        config(positions="rotary", n_embd=12, n_head=4)


def test_swiglu_keeps_about_the_parameters_of_the_4x_mlp():
    gelu, swiglu = GPT(config(n_embd=96, n_head=4)), GPT(config(n_embd=96, n_head=4, mlp="swiglu"))
    assert abs(swiglu.num_params() / gelu.num_params() - 1) < 0.1


def test_zero_init_starts_every_block_as_the_identity():
    model = GPT(config(zero_init=True, tie_embeddings=False))
    assert all((p == 0).all() for n, p in model.named_parameters() if n.endswith("c_proj.weight"))
    assert (model.lm_head.weight == 0).all() and not (model.transformer.wte.weight == 0).all()


def test_soft_capped_logits_stay_inside_the_cap():
    model = GPT(config(logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits, _ = model(torch.randint(11, (2, 8)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_hidden_matrices_are_the_blocks_2d_weights_only():
    model = GPT(config(tie_embeddings=False))
    hidden = {id(p) for p in model.hidden_matrices()}
    assert id(model.lm_head.weight) not in hidden and id(model.transformer.wte.weight) not in hidden
    assert len(hidden) == 4 * model.config.n_layer  # qkv, attention out, MLP in and out


@pytest.mark.parametrize(
    "block, new_tokens",
    [
        ({"block_size": 8}, 14),
        ({"block_size": 8, "bigram_embedding": True}, 14),
        ({"block_size": 6, **MODERN}, 30),
        ({"block_size": 8, "bigram_embedding": True, "ngram_rows": (7, 5, 3)}, 14),
        ({"block_size": 6, **MODERN, "ngram_rows": (7, 5, 3)}, 30),
    ],
    ids=[
        "learned positions",
        "learned positions and bigrams",
        "rotary positions and bigrams",
        "learned positions and n-grams",
        "rotary positions and n-grams",
    ],
)
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 3)])
def test_generation_with_the_cache_gives_the_same_tokens_as_without_far_past_block_size(
    block, new_tokens, temperature, top_k
):
    """Learned positions: past block_size the window is cropped and recomputed, as the uncached
    path does. Rotary: the attention window slides; the cache keeps its speed, and the uncached
    path recomputes the tokens the last position depends on, at their own positions."""
    torch.manual_seed(3)
    model = with_trained_ngram_rows(GPT(config(**block))).eval()
    start = torch.randint(11, (4, 3))
    outs = [
        generate(model, start, new_tokens, temperature, top_k, torch.Generator().manual_seed(5), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert outs[0].shape == (4, 3 + new_tokens) and torch.equal(outs[0], outs[1])


def test_rotary_cached_logits_match_a_sliding_window_forward_past_block_size():
    torch.manual_seed(2)
    model = GPT(config(block_size=5, **MODERN)).eval()
    idx = torch.randint(11, (2, 17))
    full, _ = model(idx)  # longer than block_size: each position sees the 5 before it, its own included
    cache = KVCache(model.config.n_layer, model.config.block_size - 1)
    steps = [model(idx[:, :3], cache=cache)[0]]
    steps += [model(idx[:, t : t + 1], cache=cache, before=idx[:, t - 1 : t])[0] for t in range(3, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.keys[0].size(2) == 4  # the window's other positions, not the whole sample


def test_each_position_adds_the_bigram_row_of_its_pair_and_a_window_start_the_unseen_row():
    model = GPT(config(bigram_embedding=True))
    V = model.config.vocab_size
    idx = torch.tensor([[3, 5, 7], [0, 10, 10]])
    assert model.bigrams(idx).tolist() == [[V * V, 3 * V + 5, 5 * V + 7], [V * V, 0 * V + 10, 10 * V + 10]]
    assert model.bigrams(idx, before=torch.tensor([[2], [9]]))[:, 0].tolist() == [2 * V + 3, 9 * V + 0]
    assert model.transformer.bte.num_embeddings == V * V + 1


def test_the_token_before_a_window_changes_its_logits_through_its_first_bigram():
    torch.manual_seed(8)
    model = GPT(config(bigram_embedding=True, positions="rotary")).eval()
    idx = torch.randint(11, (1, 6))
    unseen, seen = model(idx)[0], model(idx, before=torch.tensor([[4]]))[0]
    assert not torch.allclose(unseen, seen)
    torch.testing.assert_close(model(idx, before=torch.tensor([[4]]))[0], seen)


def test_an_ngram_row_depends_on_its_last_n_tokens_alone_and_unseen_ones_count_as_one_symbol():
    model = GPT(config(ngram_rows=(1000, 1000)))  # 3- and 4-grams
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = torch.tensor([[9, 9, 3, 4, 5, 6]])  # the same tokens from position 2 on
    (tri_a, quad_a), (tri_b, quad_b) = model.ngrams(a), model.ngrams(b)
    assert torch.equal(tri_a[:, 4:], tri_b[:, 4:]) and not torch.equal(tri_a[:, 3], tri_b[:, 3])
    assert torch.equal(quad_a[:, 5:], quad_b[:, 5:]) and not torch.equal(quad_a[:, 4], quad_b[:, 4])
    assert all(rows.min() >= 0 and rows.max() < 1000 for rows in model.ngrams(torch.randint(11, (8, 16))))
    # the tokens before a window: the same rows as the longer sequence's; none before: "not seen"
    whole = model.ngrams(torch.tensor([[7, 8, 9, 1, 2, 3, 4, 5, 6]]))
    for rows, rows_whole in zip(model.ngrams(a, before=torch.tensor([[7, 8, 9]])), whole):
        assert torch.equal(rows, rows_whole[:, 3:])
    assert not torch.equal(model.ngrams(a)[1][:, 0], whole[1][:, 3])
    assert model.lookback == 3 and GPT(config(bigram_embedding=True)).lookback == 1 and GPT(config()).lookback == 0


def test_ngram_rows_start_at_zero_and_a_learnt_row_changes_the_positions_that_read_it():
    torch.manual_seed(0)
    model = GPT(config(ngram_rows=(13, 17))).eval()
    assert not any(table.weight.any() for table in model.transformer.nte)
    idx = torch.randint(11, (1, 10))
    trigram_rows = model.ngrams(idx)[0][0]
    first = int((trigram_rows == trigram_rows[6]).nonzero()[0])  # the first position that reads row 6's
    before = model(idx)[0][0]
    with torch.no_grad():
        model.transformer.nte[0].weight[trigram_rows[6]] = 1.0
    after = model(idx)[0][0]
    torch.testing.assert_close(after[:first], before[:first])
    assert not torch.allclose(after[first], before[first])


def test_the_lookup_tables_are_the_bigram_and_ngram_tables_and_clipping_leaves_them_out():
    model = GPT(config(bigram_embedding=True, ngram_rows=(13, 17)))
    tables = {id(table.weight) for table in model.lookup_tables()}
    assert tables == {id(model.transformer.bte.weight)} | {id(t.weight) for t in model.transformer.nte}
    assert [t.num_embeddings for t in model.transformer.nte] == [13, 17]
    dense = model.dense_parameters()
    assert not tables & {id(p) for p in dense} and len(dense) + 3 == len(list(model.parameters()))


def test_rotary_generation_feeds_one_token_per_step_however_long_the_sample():
    model = GPT(config(block_size=4, positions="rotary")).eval()
    lengths = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: lengths.append(args[0].size(1)))
    generate(model, torch.zeros(2, 3, dtype=torch.long), 7)
    assert lengths == [3, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("field", ["positions", "norm", "mlp"])
def test_an_unknown_block_option_is_refused_naming_it(field):
    with pytest.raises(ValidationError, match=field):
        config(**{field: "nonsense"})


def test_a_long_rotary_prompt_fills_the_cache_with_its_receptive_field_only():
    """The whole prompt at once would build a prompt x prompt mask; the tokens equal the uncached path's."""
    torch.manual_seed(6)
    model = GPT(config(block_size=6, **MODERN)).eval()
    lengths = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: lengths.append(args[0].size(1)))
    prompt = torch.randint(11, (2, 5_000))
    cached = generate(model, prompt, 8, 1.0, None, torch.Generator().manual_seed(5))
    assert lengths == [model.receptive_field()] + [1] * 7
    plain = generate(model, prompt, 8, 1.0, None, torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(cached, plain) and cached.shape == (2, 5_008)


def test_next_token_probabilities_are_those_generation_samples_from_past_block_size():
    """With rotary positions and two layers the next token depends on more than block_size tokens."""
    torch.manual_seed(7)
    model = GPT(config(block_size=4, **MODERN)).eval()
    idx = torch.randint(11, (2, 40))
    logits, _ = model(idx)  # the whole sequence: each position sees its window, layer by layer
    expected = torch.softmax(logits[:, -1, :].float(), dim=-1)
    torch.testing.assert_close(next_token_probs(model, idx), expected, rtol=1e-5, atol=1e-6)
