"""One module per stage; each has a docstring and ``run(cfg, inputs, out_dir) -> Manifest``."""
