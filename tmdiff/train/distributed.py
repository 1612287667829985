"""Multi-process set-up: `jax.distributed` from the environment, config agreement, host data.

Environment, in order of precedence:
  TMDIFF_COORDINATOR=host:port, TMDIFF_NUM_PROCESSES, TMDIFF_PROCESS_ID   explicit
  SLURM_PROCID, SLURM_NTASKS, SLURM_STEP_NODELIST | SLURM_JOB_NODELIST    SLURM (first host)
  TMDIFF_DISTRIBUTED=tpu, or TPU_WORKER_HOSTNAMES / MEGASCALE_* set       TPU (JAX detects)
  nothing                                                                 single process
TMDIFF_INIT_TIMEOUT (seconds, default 300) bounds the wait for the coordinator;
TMDIFF_DISTRIBUTED=none forces a single process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import time

import jax
import numpy as np

DEFAULT_TIMEOUT_S = 300
SLURM_PORT_BASE = 61000  # port = base + job id % 4096, as JAX's own SLURM detection does
TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_ID")


class DistributedError(RuntimeError):
  """Multi-process set-up failed; the message says what to fix."""


class CoordinatorUnreachableError(DistributedError):
  pass


class ConfigMismatchError(DistributedError):
  pass


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins (or does not join) a multi-process run."""
  mode: str  # 'single' | 'explicit' | 'slurm' | 'tpu'
  coordinator: str | None = None
  num_processes: int = 1
  process_id: int = 0
  timeout_s: int = DEFAULT_TIMEOUT_S


def expand_nodelist(nodelist: str) -> list[str]:
  """SLURM host list ('a[01-03,07],b5') -> ['a01', 'a02', 'a03', 'a07', 'b5']."""
  hosts = []
  for prefix, body, plain in re.findall(r"([^,\[]+)\[([^\]]*)\]|([^,\[\]]+)", nodelist):
    if plain:
      hosts.append(plain)
      continue
    for part in body.split(","):
      lo, _, hi = part.partition("-")
      if not hi:
        hosts.append(prefix + lo)
        continue
      for n in range(int(lo), int(hi) + 1):
        hosts.append(prefix + str(n).zfill(len(lo)))
  return hosts


def _int(env, key) -> int:
  try:
    return int(env[key])
  except ValueError:
    raise DistributedError(f"{key}={env[key]!r} is not an integer") from None


def plan_from_env(env=None) -> Plan:
  """Reads the environment (see the module docstring); never touches JAX."""
  env = os.environ if env is None else env
  timeout = _int(env, "TMDIFF_INIT_TIMEOUT") if "TMDIFF_INIT_TIMEOUT" in env else DEFAULT_TIMEOUT_S
  forced = env.get("TMDIFF_DISTRIBUTED", "").lower()
  if forced not in ("", "none", "tpu", "auto"):
    raise DistributedError(f"TMDIFF_DISTRIBUTED={forced!r}: expected none, tpu or auto")
  if forced == "none":
    return Plan("single")
  explicit = [k for k in ("TMDIFF_COORDINATOR", "TMDIFF_NUM_PROCESSES", "TMDIFF_PROCESS_ID")
              if k in env]
  if explicit:
    if len(explicit) < 3:
      raise DistributedError(
          f"set all of TMDIFF_COORDINATOR, TMDIFF_NUM_PROCESSES, TMDIFF_PROCESS_ID (got only "
          f"{', '.join(explicit)})")
    coordinator = env["TMDIFF_COORDINATOR"]
    if not re.fullmatch(r"[^:\s]+:\d+", coordinator):
      raise DistributedError(f"TMDIFF_COORDINATOR={coordinator!r}: expected host:port")
    n, pid = _int(env, "TMDIFF_NUM_PROCESSES"), _int(env, "TMDIFF_PROCESS_ID")
    if n < 1 or not 0 <= pid < n:
      raise DistributedError(f"TMDIFF_PROCESS_ID={pid} outside [0, TMDIFF_NUM_PROCESSES={n})")
    return Plan("explicit", coordinator, n, pid, timeout)
  if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
      raise DistributedError("SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor "
                             "SLURM_JOB_NODELIST is: run under srun")
    n, pid = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
    if n == 1:
      return Plan("single")
    port = (_int(env, "TMDIFF_COORDINATOR_PORT") if "TMDIFF_COORDINATOR_PORT" in env
            else SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % 4096 if "SLURM_JOB_ID" in env
            else SLURM_PORT_BASE)
    return Plan("slurm", f"{expand_nodelist(nodelist)[0]}:{port}", n, pid, timeout)
  if forced in ("tpu", "auto") or any(k in env for k in TPU_ENV_HINTS):
    return Plan("tpu", timeout_s=timeout)
  return Plan("single")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Polls a TCP connect to host:port until it succeeds; a clear error after `timeout_s`."""
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise CoordinatorUnreachableError(
          f"coordinator {address} unreachable after {timeout_s:g} s (last error: {last}); "
          f"check that process 0 is running, the address and port (TMDIFF_COORDINATOR or the "
          f"SLURM node list) and the firewall, or raise TMDIFF_INIT_TIMEOUT")
    time.sleep(0.2)


def _use_cpu_collectives() -> None:
  # Cross-process collectives on CPU need gloo (the default in JAX 0.10; older ones had none).
  if "cpu" in os.environ.get("JAX_PLATFORMS", "") and hasattr(
      jax.config, "jax_cpu_collectives_implementation"):
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _timeout_kwargs(timeout_s: int) -> dict:
  # initialization_timeout arrived in JAX 0.4.2x; older versions wait their default.
  params = inspect.signature(jax.distributed.initialize).parameters
  return {"initialization_timeout": int(timeout_s)} if "initialization_timeout" in params else {}


def initialize_from_env(env=None) -> Plan:
  """Joins the multi-process run the environment describes (no-op for a single process).

  Non-coordinator processes first poll the coordinator's port, because JAX aborts the process
  (rather than raising) when it cannot connect.
  """
  plan = plan_from_env(env)
  if plan.mode == "single":
    return plan
  if jax.distributed.is_initialized():
    return plan
  _use_cpu_collectives()
  if plan.mode == "tpu":
    logging.info("jax.distributed: TPU auto-detection")
    jax.distributed.initialize(**_timeout_kwargs(plan.timeout_s))
    return plan
  if plan.process_id != 0:
    wait_for_coordinator(plan.coordinator, plan.timeout_s)
  logging.info("jax.distributed: process %d/%d, coordinator %s (%s)", plan.process_id,
               plan.num_processes, plan.coordinator, plan.mode)
  jax.distributed.initialize(plan.coordinator, plan.num_processes, plan.process_id,
                             **_timeout_kwargs(plan.timeout_s))
  return plan


# ---- agreement across processes ----

def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, indexed by process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils
  lengths = multihost_utils.process_allgather(np.array([len(data)], np.int64))
  size = int(np.max(lengths))
  if size == 0:
    return [b""] * jax.process_count()
  padded = np.zeros(size, np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, size)
  return [rows[i, :int(lengths.reshape(-1)[i])].tobytes() for i in range(rows.shape[0])]


def config_digest(config) -> str:
  """sha256 of the config's canonical JSON."""
  canonical = json.dumps(json.loads(config.to_json()), sort_keys=True)
  return hashlib.sha256(canonical.encode()).hexdigest()


def _flatten(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def check_same_config(config) -> str:
  """Raises ConfigMismatchError unless every process holds the same config; -> the digest.

  The error lists the processes per config hash and the keys that differ from process 0's.
  """
  digest = config_digest(config)
  digests = [d.decode() for d in allgather_bytes(digest.encode())]
  if len(set(digests)) == 1:
    return digest
  # Collective too: every process reaches it, since all saw the same digests.
  configs = [_flatten(json.loads(b)) for b in allgather_bytes(config.to_json().encode())]
  groups = {}
  for pid, d in enumerate(digests):
    groups.setdefault(d, []).append(pid)
  lines = []
  for d, ids in groups.items():
    diff = sorted(k for k in set(configs[0]) | set(configs[ids[0]])
                  if configs[0].get(k) != configs[ids[0]].get(k))
    shown = ", ".join(f"{k}={configs[ids[0]].get(k)!r}" for k in diff[:5])
    lines.append(f"processes {ids} have config sha256 {d[:12]}" +
                 (f" ({shown}{', ...' if len(diff) > 5 else ''} vs process 0)" if diff else ""))
  raise ConfigMismatchError(
      f"processes disagree on the config: {'; '.join(lines)}; this is process "
      f"{jax.process_index()}. Launch every process with the same experiment file, argument and "
      f"overrides")


# ---- host data: a fixed number of data shards, independent of the process count ----

class ShardedIterator:
  """This process's share of `num_shards` data shards, concatenated row-wise.

  `make(shard, num_shards)` returns an iterator with get_state/set_state yielding that shard's
  rows. With num_shards fixed, the global batch is the same for any process count dividing it,
  so a run on 2 hosts and one on 1 host see the same data (and can resume each other).
  """

  def __init__(self, make, num_shards: int | None = None):
    count, index = jax.process_count(), jax.process_index()
    self.num_shards = count if num_shards is None else int(num_shards)
    if self.num_shards < 1 or self.num_shards % count:
      raise DistributedError(f"data shards {self.num_shards} must be a positive multiple of "
                             f"the process count {count}")
    per = self.num_shards // count
    self.shards = list(range(index * per, (index + 1) * per))
    self.iterators = [make(s, self.num_shards) for s in self.shards]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

  def get_state(self) -> dict:
    """This process's shards only; see gather_data_state for the checkpointed form."""
    return {"num_shards": self.num_shards,
            "shards": {str(s): it.get_state() for s, it in zip(self.shards, self.iterators)}}

  def set_state(self, state: dict) -> None:
    if "num_shards" not in state:  # a checkpoint from before data shards: one shard's state
      state = {"num_shards": 1, "shards": {"0": state}}
    if int(state["num_shards"]) != self.num_shards:
      raise DistributedError(
          f"the checkpoint's data iterator has {state['num_shards']} shards but this run has "
          f"{self.num_shards}; resume with the same number of data shards")
    for s, it in zip(self.shards, self.iterators):
      it.set_state(state["shards"][str(s)])

  def __getattr__(self, name):  # token_fractions(), stats(), ... of the first shard
    return getattr(self.iterators[0], name)


def gather_data_state(local_state: dict) -> dict:
  """Merges every process's ShardedIterator state (a collective), to checkpoint on any host."""
  merged = None
  for blob in allgather_bytes(json.dumps(local_state).encode()):
    part = json.loads(blob)
    if merged is None:
      merged = part
    else:
      merged["shards"].update(part["shards"])
  return merged
