"""The training engine: typed configs, data sources, the accelerate loop and its checkpoints."""
