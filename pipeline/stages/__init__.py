"""One module per DVC stage: what it reads, does, writes and logs. `stages/<name>.py` runs it."""
