"""Device mesh and shardings: data parallel and FSDP through `jax.sharding`.

One mesh with two axes, `data` and `fsdp`. The batch is split over both axes (every
device sees different examples); parameters and optimizer state are replicated over
`data` and, when `fsdp > 1`, each array is split along its largest divisible dimension
over `fsdp` (ZeRO-3 / FSDP). The train step itself is an ordinary `jax.jit`: XLA's SPMD
partitioner inserts the all-reduces and all-gathers from these shardings, so the same
code runs on one CPU core, 8 fake devices in tests, a GPU box or a TPU pod.

Multi-host: `init_distributed` starts `jax.distributed` (explicit coordinator from the
config, or auto-detection on TPU pods / SLURM); every process then sees the global mesh,
feeds only its own rows of each batch (`shard_batch`) and reads results back with
`to_host` / `gather`.

Model FLOPs utilisation: `mfu(tokens_per_s, flops_per_token, n_devices)` divides the
achieved FLOP/s by the devices' peak: dense bf16 from `PEAK_FLOPS` for known GPUs/TPUs,
measured once (an fp32 matmul, cached) on CPU, or `parallel.peak_flops` when set.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def init_distributed(cfg) -> None:
    """Multi-host start-up: explicit coordinator from config, or auto-detection (TPU pods).

    CPU processes talk through gloo (so two processes on one laptop behave like two hosts);
    GPUs and TPUs use their own collectives."""
    if not cfg.distributed or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator_address:
        jax.distributed.initialize(cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    else:
        jax.distributed.initialize()


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = cfg.fsdp if cfg.fsdp > 0 else n
    data = cfg.data if cfg.data > 0 else n // fsdp
    if data * fsdp != n:
        raise ValueError(f"parallel.data={cfg.data} x parallel.fsdp={cfg.fsdp} does not match "
                         f"the {n} available devices")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension divisible by the fsdp size; replicate small arrays."""
    if fsdp <= 1 or not shape:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0 and shape[d] >= fsdp:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def put_global(x, sharding: NamedSharding):
    """`jax.device_put` that also works when `sharding` spans several processes.

    A value that every process holds whole (a host array, or an array on this process's
    devices, e.g. a freshly initialised or restored model) is cut into the shards this
    process owns; an array that already spans processes is resharded by a jitted identity."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(tree, mesh):
    """Place parameters / optimizer state on the mesh (FSDP when the mesh has fsdp > 1)."""
    fsdp = mesh.shape["fsdp"]
    def put(x):
        if not hasattr(x, "shape"):
            return x
        return put_global(x, NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)))
    return jax.tree.map(put, tree)


def state_shardings(tree, mesh):
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), tree)


def shard_batch(batch: dict, mesh) -> dict:
    """The global batch (host arrays) -> global arrays split over the batch axes.

    With several processes, each one hands JAX only its own contiguous slice of the rows,
    the slice its devices hold, so no process uploads data that another one trains on."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
    n, i = jax.process_count(), jax.process_index()
    def local(v):
        v = np.asarray(v)
        rows = v.shape[0] // n
        return v[i * rows:(i + 1) * rows]
    return {k: jax.make_array_from_process_local_data(sharding, local(v)) for k, v in batch.items()}


def is_main() -> bool:
    """Only process 0 writes logs, plots and DONE markers."""
    return jax.process_index() == 0


def to_host(x) -> float:
    """A replicated scalar as a Python float, on every process (a multi-host array is not
    fully addressable, so `float(x)` would fail there)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(np.asarray(x))


def batch_divisor(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def require_divisible(key: str, size: int, mesh) -> None:
    """A config error unless a batch of `size` rows (config key `key`) splits over the mesh."""
    if mesh is not None and size % batch_divisor(mesh):
        raise ValueError(f"{key}={size} must be divisible by the {batch_divisor(mesh)} devices of the mesh")


def gather(x) -> np.ndarray:
    """A (possibly multi-host, batch-sharded) array as one host NumPy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def barrier(name: str) -> None:
    """Multi-host: wait until every process gets here (e.g. after process 0 wrote a file the
    others read). A no-op in a single process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---- model FLOPs utilisation ------------------------------------------------------------
# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' data sheets. Matched
# against `device.device_kind` (lower case, first match wins: keep specific names first).
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("a10g", 70e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("tpu v4", 275e12),
)


def lookup_peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((v for k, v in PEAK_FLOPS if k in kind), None)


def measure_matmul_flops(dtype: str = "bfloat16", n: int | None = None, reps: int | None = None,
                         device=None) -> float:
    """Measured dense matmul FLOP/s of one device: a chain of `reps` (n, n) @ (n, n) products
    in one jitted loop (the chain stops XLA from hoisting them), best of 3 timings."""
    import jax.numpy as jnp
    device = device or jax.local_devices()[0]
    cpu = device.platform == "cpu"
    n = n or (1024 if cpu else 8192)
    reps = reps or (4 if cpu else 40)
    dt = jnp.dtype(dtype)
    b = jax.device_put((np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n)).astype(dt), device)
    x0 = jax.device_put(np.eye(n, dtype=dt), device)

    @jax.jit
    def chain(x, b):
        return jax.lax.fori_loop(0, reps, lambda i, x: jnp.dot(x, b), x)

    jax.block_until_ready(chain(x0, b))  # compile + warm up
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(chain(x0, b))
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 * reps / best


@functools.cache
def device_peak_flops(override: float = 0.0) -> float:
    """Peak FLOP/s of ONE device of this host, for MFU.

    `override` (`parallel.peak_flops`) wins; known GPUs/TPUs come from `PEAK_FLOPS` (dense
    bf16); CPUs are measured once with an fp32 matmul (~0.3 s, cached) and the figure is
    divided among the host's devices, since fake CPU devices share the same cores. An
    unknown accelerator is measured in bf16."""
    if override and override > 0:
        return float(override)
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return measure_matmul_flops("float32", device=device) / jax.local_device_count()
    peak = lookup_peak_flops(getattr(device, "device_kind", ""))
    return peak if peak is not None else measure_matmul_flops("bfloat16", device=device)


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None = None) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of `n_devices` devices.

    `flops_per_token` counts the model's own FLOPs (`minichat.model.flops_per_token`: 6N +
    12·L·T·C for a training step), not rematerialisation, so remat lowers MFU as it should."""
    peak = device_peak_flops() if not peak else peak
    return float(tokens_per_s * flops_per_token / (max(n_devices, 1) * peak))


def mesh_size(mesh) -> int:
    return 1 if mesh is None else int(mesh.size)
