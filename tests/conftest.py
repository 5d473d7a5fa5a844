"""Test set-up: 8 fake CPU devices (for the sharding tests) and a persistent compile cache.

Both must be set before JAX runs any operation, hence at the top of conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

# The tests compare float32 code paths to tight tolerances (KV cache vs full forward, a NumPy
# GPT-2, hand-written backward vs autodiff). On NVIDIA GPUs JAX's default precision runs float32
# matmuls in TF32 (10-bit mantissa), which moves logits by ~1e-3: ask for true float32 there.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/minichat/jax-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

# JIT compiles take longer than hypothesis' 200 ms deadline; few examples keep the suite fast.
settings.register_profile("minichat", deadline=None, max_examples=25, print_blob=True)
settings.load_profile("minichat")
