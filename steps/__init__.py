"""Pipeline steps: plain modules with a frozen `Config`, an `Output` and `run(cfg, *, out_dir, inputs, tracker)`."""
