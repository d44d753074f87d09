"""The run's machinery, not the recipe: processes and DDP, sharded checkpoints, the token cache,
flags from the typed config, the curves. train.py imports these; none of them imports train.py."""
