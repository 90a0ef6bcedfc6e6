"""Process-group setup for the trainers, under a launcher (deepspeed, torchrun) or as one plain process.

Without a launcher `deepspeed.init_distributed()` falls back to MPI discovery and fails without mpi4py
(docs/design.md §11.2), so a plain `python vimpac/pretrain.py` first fills in the environment of a one-process
world (RANK 0, WORLD_SIZE 1, a free local MASTER_PORT). On a machine without CUDA the CPU accelerator is chosen
explicitly (DS_ACCELERATOR=cpu; the backend is then gloo), and each rank gets its share of the cores instead of
every rank using all of them.

DeepSpeed's CPU backend also JIT-compiles a shared-memory all-reduce op at initialisation (about a minute and a
C++ compiler on first use) that only its inference all-reduce calls, and maps a /dev/shm segment per rank
(~69 MB) that it never unlinks: every CPU run would leave them behind until /dev/shm fills. Training never calls
it, so `init_distributed` skips building it.

Gloo's process groups have no shutdown: `destroy_process_group` only drops torch's references, and a group's
threads stop when the last reference goes. A trained DeepSpeed engine is kept alive by the gradient hooks ZeRO
registers (held by autograd, out of the garbage collector's sight) and holds the groups it uses; and
torch.distributed.nn binds the default group into its functions' defaults when imported after initialisation
(DeepSpeed imports it lazily). So the groups' threads used to run on into interpreter finalization and the exit,
while the peers were exiting too, and now and then a finished rank aborted on its way out ("terminate called
without an active exception"). `shutdown_distributed` takes the engines apart (`track_engine` registers them) and
frees the groups while the interpreter is whole; tests/test_pretrain_runs.py checks that no group thread is left.
Under ZeRO-3, `engine.destroy()` is not enough: DeepSpeed's stage-3 code keeps the model reachable from
module-level state (a stack of modules it never pops, an lru_cache keyed by modules), which `shutdown_distributed`
empties too.
"""

from __future__ import annotations

import gc
import importlib
import os
import socket
import sys
import weakref
from typing import Any

import torch

from vimpac.errors import UsageError

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_ENGINES: weakref.WeakSet = weakref.WeakSet()  # engines `shutdown_distributed` takes apart


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Rank variables of launchers that start several processes without torch's RANK/WORLD_SIZE: (rank, size) names.
FOREIGN_LAUNCHERS = {
    "OpenMPI (mpirun)": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    "MPICH / Intel MPI (PMI)": ("PMI_RANK", "PMI_SIZE"),
    "MVAPICH": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
    "SLURM (srun)": ("SLURM_PROCID", "SLURM_NTASKS"),
}


def foreign_launcher(env: dict[str, str]) -> str | None:
    """The launcher that started this process as one of several ranks without setting torch's RANK (an MPI or
    SLURM launcher), or None. A single task (an sbatch script running deepspeed inside) is not one."""
    for name, (rank, size) in FOREIGN_LAUNCHERS.items():
        if rank in env and env.get(size, "1").isdigit() and int(env.get(size, "1")) > 1:
            return name
    return None


def prepare_environment(env: dict[str, str] | None = None) -> bool:
    """Fill in a one-process world where no launcher did; choose the CPU accelerator without CUDA.

    Must run before deepspeed is imported (it picks the accelerator at import). Returns True when the process
    was started by a launcher. `env` defaults to os.environ (tests pass a dict)."""
    env = os.environ if env is None else env
    launched = all(name in env for name in LAUNCHER_VARIABLES)
    if not launched:
        started_by = foreign_launcher(env)
        if started_by is not None:
            raise UsageError(
                f"this process is one of several started by {started_by} without RANK/LOCAL_RANK/WORLD_SIZE, so it "
                "would train alone; launch with deepspeed (one node) or scripts/multinode/launch.sh (pdsh, or "
                "NO_SSH=1 on every node)"
            )
        env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return launched


def cpu_accelerator(env: dict[str, str] | None = None) -> bool:
    """Whether DeepSpeed runs on its CPU accelerator: no CUDA, or DS_ACCELERATOR=cpu beside a GPU (e.g. `vimpac demo
    --device cpu` on a GPU machine), where the ranks are CPU processes on gloo although CUDA is visible."""
    env = os.environ if env is None else env
    return env.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def cpu_threads_per_rank(env: dict[str, str] | None = None) -> int | None:
    """Cores per rank on a CPU-only machine, unless OMP_NUM_THREADS already decides (None: leave torch alone)."""
    env = os.environ if env is None else env
    if not cpu_accelerator(env) or "OMP_NUM_THREADS" in env:
        return None
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env.get("WORLD_SIZE", "1"))))
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, local_rank, world_size)."""
    import deepspeed  # after prepare_environment, which decides the accelerator

    threads = cpu_threads_per_rank()
    if threads is not None:
        torch.set_num_threads(threads)
    if cpu_accelerator():
        # import_module: the attribute deepspeed.comm.torch is the torch package, not this submodule.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see the module docstring
    # Its functions take `group=group.WORLD` as a default, evaluated at import: imported later (DeepSpeed does,
    # lazily) they would hold the default group for the life of the process.
    importlib.import_module("torch.distributed.nn.functional")
    deepspeed.init_distributed(dist_backend=backend)
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def track_engine(engine: Any) -> None:
    """Have `shutdown_distributed` take `engine` (a DeepSpeedEngine) apart before the process groups go."""
    _ENGINES.add(engine)


def _forget_zero3_modules() -> None:
    """Drop the modules DeepSpeed's ZeRO-3 code keeps in module-level state after `engine.destroy()`: the forward
    stack (the root module is pushed at set-up and never popped) and the release-plan lru_cache, keyed by the
    parameter coordinator and submodules (the cache sits in the closure of DeepSpeed's NVTX wrapper). Neither is
    needed once the engines are gone; any name missing in another DeepSpeed version is left alone."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    release_plan = vars(cls).get("_PartitionedParameterCoordinator__params_to_release") if cls else None
    cells = [cell.cell_contents for cell in getattr(release_plan, "__closure__", None) or ()]
    for candidate in (release_plan, getattr(release_plan, "__wrapped__", None), *cells):
        cache_clear = getattr(candidate, "cache_clear", None)
        if callable(cache_clear):
            cache_clear()


def shutdown_distributed() -> None:
    """Stop the process groups' threads while the interpreter is still whole (see the module docstring): remove
    the tracked engines' hooks so that they and the groups they hold can be freed, destroy the groups through
    DeepSpeed (which also drops its own references to them), and collect."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import deepspeed.comm

    while _ENGINES:
        _ENGINES.pop().destroy()  # no name left holding an engine through the collection
    _forget_zero3_modules()
    gc.collect()  # the engines, their optimizers and the parameters holding groups
    deepspeed.comm.destroy_process_group()
    gc.collect()
