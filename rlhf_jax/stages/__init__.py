"""L4: one module per stage, each with `check(config)` (its preflight, from the config alone) and
`run(config, workdir) -> summary dict`. A stage never imports another stage; they meet in WORKDIR, through the
parameters each exports (rlhf_jax.training.export_params), and in rlhf_jax/pipeline.py's registry."""
