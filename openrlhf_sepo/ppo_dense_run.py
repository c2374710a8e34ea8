"""``train_ppo_dense``'s run: OpenRLHF's own ``openrlhf.cli.train_ppo_ray``, run as ``__main__`` with its own flags,
plus the ``--dense.*`` flags, its trainer replaced by ``ppo_dense_trainer.DensePPOTrainerActor``, and on a machine
without CUDA or vLLM the CPU runtime (``openrlhf_sepo.cpu.ray_ppo``).

The order of a run (``run``):

1. the generation engine is decided (the vLLM stand-in only if no vllm is installed) and named in the log:
   ``[train_ppo_dense] generation engine: vLLM <version>`` or ``... vLLM stand-in (HF generate; vllm not
   importable)``;
2. train_ppo_ray's ``__main__`` builds its parser; the ``--dense.*`` flags are added to it; it parses; the dense
   flags and what this machine cannot run are refused (exit 2), before Ray starts or any model loads;
3. train_ppo_ray checks its own flags and calls ``train(args)``: its ``ray.init`` gets, on a CPU machine, logical
   GPUs and the workers' set-up hook; its ``PPOTrainer`` is ``DensePPOTrainerActor``.

Every OpenRLHF touch point used here is in ``openrlhf_internals`` (``extra_flags_on_first_parse``,
``ppo_trainer_class``, ``ray_init_with``). On a machine with CUDA and vLLM nothing is patched: only the flags and the
trainer class are added.
"""

import sys

LOG_PREFIX = "[train_ppo_dense]"
TRAIN_PPO_RAY = "openrlhf.cli.train_ppo_ray"


def say(message: str) -> None:
    """A line of the run's log, ``[train_ppo_dense] message`` (stdout, flushed: Ray's worker lines interleave)."""
    print(f"{LOG_PREFIX} {message}", flush=True)


def runtime_problems(args, runtime) -> list:
    """What cannot run among ``args`` (train_ppo_ray's nested flags) on this machine's ``runtime``
    (``cpu.ray_ppo.Runtime``), as messages for the user (empty: all runs). Beyond the runtime's limits, it refuses
    dense rewards with ``--train.async_enable`` (OpenRLHF's async trainer is not the one swapped) and runs without
    rollout engines (OpenRLHF 0.11.2's sample generator has no other way to generate)."""
    problems = []
    if args.dense.source != "none" and args.train.async_enable:
        problems.append("--train.async_enable runs OpenRLHF's PPOTrainerAsync, which has no dense rewards: "
                        "--dense.source none, or no --train.async_enable")
    if not args.vllm.num_engines:
        problems.append("--vllm.num_engines >= 1: OpenRLHF 0.11.2's PPO generates through its rollout engines only")
    if runtime.cpu:
        if "flash" in args.ds.attn_implementation or args.ds.packing_samples or args.ds.ring_attn_size > 1:
            problems.append("without CUDA there are no flash-attn kernels: --ds.attn_implementation sdpa (or eager), "
                            "no --ds.packing_samples, no --ds.ring_attn_size")
        if args.train.colocate_all and args.vllm.sync_backend == "nccl":
            problems.append("--train.colocate_all with --vllm.sync_backend nccl syncs weights by CUDA IPC: use "
                            "--vllm.sync_backend gloo")
    if runtime.standin:
        if args.vllm.tensor_parallel_size != 1:
            problems.append("the vLLM stand-in runs one worker per engine: --vllm.tensor_parallel_size 1")
        if args.vllm.sync_with_ray:
            problems.append("the vLLM stand-in syncs weights through its own gloo group: drop --vllm.sync_with_ray")
        if args.data.max_images_per_prompt > 0:
            problems.append("the vLLM stand-in generates from text only: --data.max_images_per_prompt 0")
    return problems


def run(argv) -> int:
    """Run train_ppo_ray with ``argv`` (its flags and the ``--dense.*`` ones) as described above; the exit status."""
    from openrlhf_sepo import vllm_standin
    from openrlhf_sepo.cpu import ray_ppo
    from openrlhf_sepo.cpu.__main__ import run_module

    runtime = ray_ppo.prepare_driver()
    say(f"generation engine: {vllm_standin.engine_description()}")
    if runtime.cpu:
        say("no CUDA: Ray gets logical GPUs; the workers run OpenRLHF's CUDA calls on the CPU")

    from openrlhf.utils.config import hierarchize

    from openrlhf_sepo import openrlhf_internals as internals
    from openrlhf_sepo.ppo_dense import DenseFlagError, add_dense_flags, check_dense_flags
    from openrlhf_sepo.ppo_dense_trainer import DensePPOTrainerActor

    parsed = {}

    def after_parse(flat_args):
        args = hierarchize(flat_args)  # a copy: train_ppo_ray nests its own
        try:
            plan = check_dense_flags(args)
        except DenseFlagError as e:
            print(f"{LOG_PREFIX} error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        problems = runtime_problems(args, runtime)
        if problems:
            print(f"{LOG_PREFIX} error: this run cannot work here:\n  - " + "\n  - ".join(problems),
                  file=sys.stderr, flush=True)
            raise SystemExit(2)
        parsed["args"] = args
        groups = ", ".join(name for name, _, _ in plan.groups()) or "none"
        say(f"dense source: {plan.source} (dense groups: {groups}); trainer: "
            f"{DensePPOTrainerActor.__ray_metadata__.class_name}")

    with internals.extra_flags_on_first_parse(add_dense_flags, after_parse), \
            internals.ppo_trainer_class(DensePPOTrainerActor), \
            internals.ray_init_with(ray_ppo.ray_init_update(runtime, lambda: parsed["args"])):
        return run_module(TRAIN_PPO_RAY, argv)
