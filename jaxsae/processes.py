"""Several processes: starting jax.distributed, and work that process 0 does for all.

Every process of a run executes the same collectives in the same order; one that stops early
(an error only process 0 can meet) leaves the others waiting in a collective it never reaches.
`on_process_0` hands process 0's error to every process. (A signal that reaches only some of
the processes: `interrupts.SignalFlag`.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxsae.errors import ConfigError, JaxsaeError, describe_os_error

T = TypeVar("T")

# Environments in which `distributed: auto` starts jax.distributed (variable -> what it means).
CLUSTER_HINTS = {
    "JAX_COORDINATOR_ADDRESS": "an explicit coordinator (with JAX_NUM_PROCESSES, JAX_PROCESS_ID)",
    "SLURM_JOB_ID": "a SLURM job with more than one task (SLURM_NTASKS > 1)",
    "TPU_WORKER_HOSTNAMES": "a multi-host TPU slice",
    "OMPI_MCA_orte_hnp_uri": "an Open MPI launch",
}


def cluster_environment() -> str | None:
    """The multi-process launch this process is part of, if any (see CLUSTER_HINTS)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM_JOB_ID"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU_WORKER_HOSTNAMES"
    if env.get("OMPI_MCA_orte_hnp_uri"):
        return "OMPI_MCA_orte_hnp_uri"
    return None


def initialize_distributed(mode: str) -> str | None:
    """Starts jax.distributed for `mode` 'on', or 'auto' in a cluster environment; must run
    before anything touches the devices. Returns what was detected (None: single process)."""
    if mode == "off" or jax.distributed.is_initialized():
        return None
    found = cluster_environment()
    if mode == "auto" and found is None:
        return None
    # CPU processes exchange collectives through gloo (no effect on accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = os.environ
    kwargs = {}
    if found == "JAX_COORDINATOR_ADDRESS":
        try:
            kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                      "num_processes": int(env["JAX_NUM_PROCESSES"]),
                      "process_id": int(env["JAX_PROCESS_ID"])}
        except (KeyError, ValueError):
            raise ConfigError("distributed: JAX_COORDINATOR_ADDRESS is set; also set "
                              "JAX_NUM_PROCESSES and JAX_PROCESS_ID (integers)") from None
        _check_launch(**kwargs)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:  # JAX found no complete launch to join
        what = (f"{found} is set ({CLUSTER_HINTS[found]})" if found
                else "on, and JAX detected no cluster")
        reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else repr(e)
        if "Failed to start RPC server" in reason:  # (fault testing: the advice below, for a
            # coordinator port another program held)
            where = kwargs.get("coordinator_address", "auto-detected")
            raise ConfigError(f"distributed: the coordinator ({where}) cannot listen: "
                              f"{reason} (its port in use?); choose another "
                              "JAX_COORDINATOR_ADDRESS port") from None
        raise ConfigError(
            f"distributed: {what}, but jax.distributed cannot start: {reason}. Launch every "
            "process through the cluster (srun, mpirun), or set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID; distributed: off runs one process") from None
    check_even_devices()
    return found or "jax.distributed auto-detection"


def check_even_devices() -> None:
    """Refuses, on every process (each tells from its own counts), a run whose processes hold
    different numbers of devices: the global arrays and the comparisons of the processes'
    settings assume the same number on each (fault testing: a traceback from a gather)."""
    total, here, count = jax.device_count(), jax.local_device_count(), jax.process_count()
    if total != here * count:
        raise ConfigError(f"distributed: {total} devices over {count} processes, {here} on "
                          f"process {jax.process_index()}: every process needs the same number "
                          "of devices (CUDA_VISIBLE_DEVICES, XLA_FLAGS)")


def _check_launch(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """What every process can see is wrong in an explicit launch, refused on every process
    (fault testing: with port -1, process 0 failed at once and process 1 waited five minutes
    for a coordinator that could never start)."""
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"distributed: JAX_COORDINATOR_ADDRESS {coordinator_address!r} is "
                          "not HOST:PORT with a port from 1 to 65535")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"distributed: JAX_PROCESS_ID {process_id} is not one of the "
                          f"JAX_NUM_PROCESSES ({num_processes}) processes 0..{num_processes - 1}")


_MESSAGE_BYTES = 1024


def agree(mine: str, differences: Callable[[str], str | None]) -> None:
    """Checks that the processes of a run were given the same thing (a config, the identity
    of their data): process 0's `mine` (text) is sent to every process, which compares it
    with its own (`differences(process_0s)`: a line saying what differs, or None). If some
    process differs, every process stops with its line, before anything is computed with
    arguments that do not agree (fault testing: two processes given different learning
    rates, seeds or data trained a mix of both and exited 0; different widths crashed in a
    collective)."""
    if jax.process_count() == 1:
        return
    text = mine.encode()
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(text), np.int64)))
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = np.frombuffer(text, np.uint8)
    theirs = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)).decode()
    first = _first_line(differences(theirs) if jax.process_index() else None)
    if first is not None:
        index, line = first
        raise ConfigError(f"process {index} was not given what process 0 was: {line}; "
                          "start every process of a run with the same config and data")


def _encoded(text: str | None) -> np.ndarray:
    """A one-line message as a fixed-size buffer for a collective (zeros: none)."""
    message = np.zeros(_MESSAGE_BYTES, np.uint8)
    if text:
        data = text.encode()[:_MESSAGE_BYTES - 1]
        message[:len(data) + 1] = np.frombuffer(data + b"\0", np.uint8)
    return message


def _decoded(message: np.ndarray) -> str:
    return bytes(np.asarray(message, np.uint8)).split(b"\0")[0].decode(errors="replace")


def _error_line(error: Exception | None) -> str | None:
    if error is None:
        return None
    return (str(error) if isinstance(error, JaxsaeError)
            else describe_os_error(error) if isinstance(error, OSError)
            else f"{type(error).__name__}: {error}")


def _first_line(line: str | None) -> tuple[int, str] | None:
    """Every process's `line` (None: nothing to say) gathered: the first process that said
    something, and what."""
    lines = np.asarray(multihost_utils.process_allgather(_encoded(line)), np.uint8)
    for index, message in enumerate(lines.reshape(-1, _MESSAGE_BYTES)):
        if message.any():
            return index, _decoded(message)
    return None


def on_process_0(work: Callable[[], T]) -> T | None:
    """Runs `work` on process 0 only (None elsewhere). With several processes, the others wait
    for it and, if it raised, stop with the same one-line error, instead of waiting at the next
    collective for a process that is gone."""
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = work()
        except Exception as e:  # handed on below, then raised here as it was
            error = e
    if jax.process_count() > 1:
        failed, message = multihost_utils.broadcast_one_to_all(
            (np.asarray(error is not None), _encoded(_error_line(error))))
        if bool(failed) and error is None:
            raise JaxsaeError(f"{_decoded(message)} (on process 0)")
    if error is not None:
        raise error
    return result


def on_every_process(work: Callable[[], T]) -> T:
    """Runs `work` on every process; if it raised on some, every process stops, with its own
    error or the first failing process's one-line message (fault testing: a data directory
    only one process could not open left the other waiting in a collective for good)."""
    result, error = None, None
    try:
        result = work()
    except Exception as e:  # handed on below, then raised here as it was
        error = e
    if jax.process_count() > 1:
        first = _first_line(_error_line(error))
        if first is not None and error is None:
            raise JaxsaeError(f"{first[1]} (on process {first[0]})")
    if error is not None:
        raise error
    return result
