"""Test configuration: 8 simulated CPU devices for the sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("FAST", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
