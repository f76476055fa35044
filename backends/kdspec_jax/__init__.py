"""JAX backend for kdspec: its own Llama/Gemma-family model, HF weights in and out, optax
training steps and ``jax.sharding`` meshes. Importing this package imports jax."""
