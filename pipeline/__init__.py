"""A tracked character-level GPT pipeline: data, model, training, evaluation, sampling, tracking."""
