"""The per-replica MLX engine: GPU scheduler, stream registry, model store. Never imports Ray."""
