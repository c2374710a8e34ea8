"""``python -m openrlhf_sepo.cpu MODULE [ARGS...]``: run an OpenRLHF-style entrypoint module without CUDA.

Works as one process (the rendezvous variables are set here when no launcher set them) and under
``torchrun --nproc_per_node N -m openrlhf_sepo.cpu MODULE ...`` (or DeepSpeed's launcher).
MODULE is run as ``__main__`` with ARGS as its command line, exactly as ``python -m MODULE ARGS``.

``python -m openrlhf_sepo.cpu --jobs FILE`` runs a batch of such entrypoints one after another in the same
processes (same launcher, same ranks). FILE is a JSON list of ``{"name", "module", "args"[, "log", "done"]}``.
On 2 CPU cores a tiny training run spends about two thirds of its wall time starting Python, importing
torch / DeepSpeed / OpenRLHF and rendezvousing; a batch pays that once. Each job still builds its own
strategy, DeepSpeed engine and seeds through its entrypoint. A job whose ``done`` file exists is skipped
(resume); after a job finishes on every rank, rank 0 writes its wall seconds into ``done``. ``log`` receives
the job's stdout and stderr (appended by every rank). A failing job stops the batch with its exit status.
"""

import json
import os
import runpy
import sys
import time

from openrlhf_sepo.cpu import patch_openrlhf_for_cpu, set_single_process_rendezvous

USAGE = ("usage: python -m openrlhf_sepo.cpu MODULE [ARGS...]   e.g. openrlhf.cli.train_dpo --data.dataset ...\n"
         "       python -m openrlhf_sepo.cpu --jobs FILE            (a JSON list of {name, module, args, log, done})")


def run_module(module: str, args) -> int:
    """Run ``module`` as ``__main__`` with ``args`` as its command line (``sys.argv`` restored after); its exit status
    (0 when it returns). Also ``ppo_dense_run``'s way to run train_ppo_ray."""
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr, flush=True)  # sys.exit("message"): print it, as the interpreter would
        return 1
    finally:
        sys.argv = saved
    return 0


def _to_log(path):
    """Point this process's stdout/stderr (file descriptors too: DeepSpeed's C++ ops print there) at ``path``;
    returns the saved descriptors for ``_restore``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore(saved):
    for stream in (sys.stdout, sys.stderr):
        if not stream.closed:
            stream.flush()
    for fd, target in zip(saved, (1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    # A job may close sys.stdout (json.tool does, on success): reopen it on the restored descriptor.
    if sys.stdout.closed:
        sys.stdout = open(1, "w", buffering=1, closefd=False)
    if sys.stderr.closed:
        sys.stderr = open(2, "w", buffering=1, closefd=False)


def run_jobs(path: str) -> int:
    """Run the batch in ``path`` (see the module docstring); the first non-zero exit status, else 0."""
    import torch.distributed as dist

    with open(path, encoding="utf-8") as f:
        jobs = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    # The batch owns one process group for all its jobs (DeepSpeed and score_tokens reuse an existing one). Were a
    # job to create and destroy its own, the next job's rendezvous could read the dead group's addresses from
    # the launcher's store (seen: "Connection refused" when a resumed batch began with a scoring job).
    owned = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owned:
        import torch

        cuda = torch.cuda.is_available()  # on a GPU machine this runtime changes nothing: NCCL, as DeepSpeed would
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        return _run_batch(jobs, rank, say, dist)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _run_batch(jobs, rank, say, dist) -> int:
    """The jobs in order (skip the done, log, mark done after a barrier); the first non-zero status, else 0."""
    for job in jobs:
        done = job.get("done")
        if done and os.path.exists(done):
            say(f"[jobs] {job['name']}: done already, skipped")
            continue
        say(f"[jobs] {job['name']}: {job['module']} ...")
        start = time.time()
        saved = _to_log(job["log"]) if job.get("log") else None
        try:
            status = run_module(job["module"], job["args"])
        finally:
            if saved:
                _restore(saved)
        if status:
            print(f"[jobs] {job['name']} failed with exit status {status}; log: {job.get('log')}", flush=True)
            return status
        if dist.is_initialized():
            dist.barrier()  # every rank has finished (and saved) before the job counts as done
        seconds = round(time.time() - start, 1)
        if done and rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(done)), exist_ok=True)
            with open(done, "w") as f:
                f.write(f"{seconds}\n")
        say(f"[jobs] {job['name']}: done in {seconds} s")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or (argv[0].startswith("-") and argv[0] != "--jobs"):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    set_single_process_rendezvous()
    patch_openrlhf_for_cpu()
    if argv[0] == "--jobs":
        if len(argv) != 2:
            print(USAGE, file=sys.stderr)
            return 2
        return run_jobs(argv[1])
    return run_module(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
