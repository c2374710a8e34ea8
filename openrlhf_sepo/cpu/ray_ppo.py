"""OpenRLHF's Ray PPO (``openrlhf.cli.train_ppo_ray``) on a machine without CUDA or without vLLM.

What a CPU machine lacks, and the answer here (each OpenRLHF touch point is in ``openrlhf_sepo.openrlhf_internals``):

=====================================================  ===========================================================
OpenRLHF 0.11.2 needs                                  here
=====================================================  ===========================================================
``import vllm`` (rollout engines, SamplingParams,       ``openrlhf_sepo.vllm_standin`` registered as ``vllm``, only
weight-sync group)                                      when no vllm is installed (driver and every Ray worker)
GPU bundles in placement groups, ``num_gpus=1``         ``ray.init(num_gpus=N, num_cpus=N + 2)``: logical resources
actors                                                  (``ray_init_update``), nothing is pinned to a device
``torch.cuda.*`` calls in the Ray actors                ``setup_worker``, Ray's ``worker_process_setup_hook``:
                                                        ``patch_torch_cuda_for_cpu_worker`` + the strategy patches
                                                        (``openrlhf_sepo.cpu``) + the flash-attn placeholder
the replay buffer's ``cuda:<n>`` device                 the CPU (``patch_torch_cuda_for_cpu_worker``)
weight sync actor -> engines (NCCL)                     the stand-in's gloo group; ``--vllm.sync_backend gloo``
=====================================================  ===========================================================

``runtime_for(args)`` says which of these a run needs: on a machine with CUDA and an importable vLLM it needs none,
and nothing is patched or hooked (OpenRLHF's engines and CUDA paths run unchanged).
"""

import os

# Ray's worker set-up hook, by name: imported in each worker process of the job before it runs any task.
SETUP_HOOK = "openrlhf_sepo.cpu.ray_ppo.setup_worker"
# Set in the workers' environment when the driver registered the vLLM stand-in (the workers then register it too).
STANDIN_ENV = "OPENRLHF_SEPO_VLLM_STANDIN"
# Read by the raylet that ray.init starts: its workers' niceness relative to it (Ray's default 15).
WORKER_NICENESS_ENV = "RAY_worker_niceness"
# Room for the dense-reward sources the dense trainer adds (oracle and dense reference, or a token RM): at most two
# groups per run, each laid out as the reference model (openrlhf_sepo.ppo_dense_trainer.dense_group_layout).
MAX_DENSE_GROUPS = 2


class Runtime:
    """What a run on this machine needs: ``cpu`` (no CUDA: logical GPUs, the worker hook's CUDA patches) and
    ``standin`` (no vLLM: the stand-in engine, registered by the hook in the workers too). ``needed`` is False on a
    machine with both, where nothing is changed."""

    def __init__(self, cpu: bool, standin: bool):
        self.cpu, self.standin = cpu, standin

    @property
    def needed(self) -> bool:
        return self.cpu or self.standin


def prepare_driver() -> Runtime:
    """Register the vLLM stand-in in this process if no vllm is installed (before anything imports OpenRLHF's Ray
    PPO), and say what the run needs."""
    import torch

    from openrlhf_sepo import vllm_standin

    standin = vllm_standin.install_if_missing()
    return Runtime(cpu=not torch.cuda.is_available(), standin=standin)


def logical_gpus(args) -> int:
    """Logical GPUs for ``args`` (train_ppo_ray's nested flags): one per rank of every model group (actor, reference
    when the KL coefficient is positive, critic, reward model unless remote), one per vLLM engine worker, plus
    ``MAX_DENSE_GROUPS`` groups of the reference's size. Colocated groups need fewer, a run without dense sources
    none of the last; logical GPUs cost nothing, so this does not subtract them."""
    def group(name):
        g = getattr(args, name)
        return g.num_nodes * g.num_gpus_per_node

    n = group("actor") + group("critic")
    if args.algo.kl.init_coef > 0:
        n += group("ref")
    if not args.reward.remote_url:
        n += group("reward")
    n += (args.vllm.num_engines or 0) * args.vllm.tensor_parallel_size
    return n + MAX_DENSE_GROUPS * group("ref")


def ray_init_update(runtime: Runtime, get_args):
    """For ``openrlhf_internals.ray_init_with``: train_ppo_ray's ``ray.init`` kwargs with, on a CPU machine starting its
    own Ray (no ``RAY_ADDRESS``: a running cluster brings its resources and raylet), logical GPUs and CPUs for ``get_args()`` (the parsed args, read when Ray starts), no dashboard, and the workers at the
    driver's niceness (``WORKER_NICENESS_ENV`` set in this process unless already set); and in every case where the
    runtime is needed, the worker hook and this process's import path in the runtime environment (its env vars are
    kept)."""

    def update(kwargs):
        if not runtime.needed:
            return kwargs
        runtime_env = dict(kwargs.get("runtime_env") or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        # The workers import this package (the hook, the dense trainer) from where the driver does.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        paths = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env_vars["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        if runtime.standin:
            env_vars[STANDIN_ENV] = "1"
        if runtime.cpu:
            env_vars.setdefault("DS_ACCELERATOR", "cpu")
        runtime_env["env_vars"] = env_vars
        runtime_env["worker_process_setup_hook"] = SETUP_HOOK
        kwargs["runtime_env"] = runtime_env
        if runtime.cpu and not (kwargs.get("address") or os.environ.get("RAY_ADDRESS")):  # a cluster has its own
            # Ray starts its workers 15 niceness steps below the driver; on a small shared CPU machine, where all of
            # a run's work is in the workers, that starves them behind any other load. They keep the driver's.
            os.environ.setdefault(WORKER_NICENESS_ENV, "0")
            n = logical_gpus(get_args())
            kwargs.setdefault("num_gpus", n)
            kwargs.setdefault("num_cpus", n + 2)  # each model actor asks 1 CPU; + the trainer actor and one spare
            kwargs.setdefault("include_dashboard", False)  # its UI is unused here
        return kwargs

    return update


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for the runs ``ray_init_update`` starts: in each worker process, before
    any task, register the vLLM stand-in if the driver did, and on a CPU machine apply the CPU patches (the
    DeepSpeed strategy's, the Ray actors' torch.cuda calls, the replay buffer's device). The flash-attn kernel
    placeholder comes with ``import openrlhf_sepo``."""
    if os.environ.get(STANDIN_ENV) == "1":
        from openrlhf_sepo import vllm_standin

        vllm_standin.install_if_missing()
    import torch

    if torch.cuda.is_available():
        return
    from openrlhf_sepo.cpu import patch_openrlhf_for_cpu
    from openrlhf_sepo.openrlhf_internals import patch_torch_cuda_for_cpu_worker

    patch_openrlhf_for_cpu()
    patch_torch_cuda_for_cpu_worker()
