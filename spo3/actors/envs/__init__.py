"""One module per environment engine; `make_env` picks one by name."""
