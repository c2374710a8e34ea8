"""The benchmark harness: one output dir, its stages, launches and resume markers, and the two modes every task
runs through (a benchmark run on the test prompts, and ``--sweep``, which re-derives the tuned settings).

A task is a *spec* (``keywords.KeywordSpec``: the demo; ``style.StyleSpec``: the TKPO benchmark). The harness reads
every task-specific name from the spec it was given, never from a module; a spec reads the run's seeds, methods,
sizes and settings from the ``Benchmark`` it is handed. What a spec provides:

  NAME              the console tag (``[demo] stage1 ...``)
  METHODS           {method: its description}; DEFAULT_METHODS (a run without --methods); QUICK_METHODS
                    (``--quick``'s); SIZES {"full", "quick"} -> sizes
                    (each with ``n_policy`` and ``policy_epochs``); GRID; OBJECTIVE (text) and OBJECTIVE_KEY (the
                    validation metric that is maximised); SETTINGS_FILE (the committed tuned settings)
  POLICY_LAUNCH     the name of the benchmark run's policy launch
  grid_points(m)    the grid of method ``m`` ([{"lr": ..., maybe "beta": ...}]); run_name(m, point) a sweep run's name
  make_data(bench, seed)           the seed's data (one stage per seed)
  stage1(bench)                    what the policies start from (launches and stages over all seeds)
  train(bench, runs, snapshots, launch)    the policy runs ({run: (method, setting)}) on every seed
  evaluate(bench, seed)            the seed's evaluation.json document (test prompts)
  validate(bench, seed, runs)      {run: metrics, OBJECTIVE_KEY among them} on the validation prompts
  sweep_entry(metrics), sweep_context(bench)   what sweep.json records per grid point, and about the run
  report(bench, wall_s)            report.md and metrics.json (and plots); returns the metrics document

Every stage and job is skipped when its done marker exists, so a rerun resumes. A launch runs its jobs through
``python -m openrlhf_sepo.cpu --jobs`` (one process start per launch, not per job).
"""

import json
import os
import subprocess
import sys
import time

from openrlhf_sepo.bench.stats import non_finite

# The launch settings every spec's training jobs share (CPU, gloo ranks, global batch BATCH).
BATCH = 32
COMMON_TRAIN = ["--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
                "--data.max_len", "128", "--train.micro_batch_size", "8", "--train.batch_size", str(BATCH),
                "--data.dataloader_num_workers", "0"]
CHAT = ["--data.apply_chat_template"]  # OpenRLHF's raw-data stages; train_sepo reads already tokenized scores


def load_settings(path, methods) -> dict:
    """The tuned settings ({method: {"lr", maybe "beta"}}) of a settings file (a --sweep's sweep.json format);
    SystemExit naming ``--settings`` when it cannot be read or lacks one of ``methods``."""
    try:
        with open(path) as f:
            settings = json.load(f)["settings"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise SystemExit(f"--settings: cannot read tuned settings from {path!r}: {e}") from None
    missing = [m for m in methods if m not in settings]
    if missing:
        raise SystemExit(f"--settings {path}: no setting for {missing}; run --sweep for them")
    return settings


def point_label(point: dict) -> str:
    """A grid point's name: ``lr=0.001,beta=1`` (or ``lr=0.001`` without beta)."""
    return ",".join(f"{k}={v:g}" for k, v in point.items())


class Benchmark:
    """One run of ``spec``: the seeds, methods, sizes and settings the flags chose (``args``: output_dir, quick,
    sweep, seeds, methods, settings, nproc), and the plumbing its spec builds on."""

    def __init__(self, spec, args):
        self.spec, self.args, self.tag = spec, args, spec.NAME
        self.out = os.path.abspath(args.output_dir)
        self.size = spec.SIZES["quick" if args.quick else "full"]
        self.methods = [m.strip() for m in args.methods.split(",")] if args.methods else (
            list(spec.QUICK_METHODS) if args.quick else list(spec.DEFAULT_METHODS))
        unknown = [m for m in self.methods if m not in spec.METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(spec.METHODS)}")
        self.seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
        if args.sweep:
            self.seeds = self.seeds[:1]
        elif len(self.seeds) < 2:
            raise SystemExit("--seeds: give at least 2 seeds (3 or more for an interval worth reading)")
        self.settings = None if args.sweep else load_settings(args.settings, self.methods)
        self.steps = self.size["n_policy"] // BATCH * self.size["policy_epochs"]  # optimizer steps per policy
        os.makedirs(self.out, exist_ok=True)

    # --- plumbing -------------------------------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def seed_path(self, seed, *parts):
        return self.path(f"seed{seed}", *parts)

    def job(self, seed, name, module, args):
        """A job of seed ``seed``: ``python -m module args``, done when seedS/done/NAME.done exists."""
        return {"name": f"seed{seed}/{name}", "module": module, "args": args,
                "done": self.seed_path(seed, "done", f"{name}.done"),
                "log": self.seed_path(seed, "logs", f"{name}.log")}

    def evaluations(self) -> dict:
        """{seed: its evaluation.json} of a finished benchmark run (what a spec's report reads)."""
        evaluations = {}
        for seed in self.seeds:
            with open(self.seed_path(seed, "evaluation.json")) as f:
                evaluations[seed] = json.load(f)
        return evaluations

    def stage(self, name, fn, marker):
        """Run ``fn`` unless ``marker`` exists; write the wall seconds into it; print progress."""
        if os.path.exists(marker):
            print(f"[{self.tag}] {name:<10} skipped (done)", flush=True)
            return
        print(f"[{self.tag}] {name:<10} ...", flush=True)
        start = time.time()
        fn()
        seconds = round(time.time() - start, 1)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(f"{seconds}\n")
        print(f"[{self.tag}] {name:<10} done in {seconds:.0f} s", flush=True)

    def launch(self, name, jobs):
        """Run ``jobs`` (``job``'s dicts) not done yet in one torchrun launch of --nproc gloo ranks."""
        from openrlhf_sepo.cpu import free_port

        todo = [j for j in jobs if not os.path.exists(j["done"])]
        print(f"[{self.tag}] {name:<10} {len(todo)} of {len(jobs)} jobs to run", flush=True)
        if not todo:
            return
        jobs_file = self.path("logs", f"{name}_jobs.json")
        os.makedirs(os.path.dirname(jobs_file), exist_ok=True)
        with open(jobs_file, "w") as f:
            json.dump(todo, f, indent=1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.args.nproc),
               "--master_port", str(free_port()), "-m", "openrlhf_sepo.cpu", "--jobs", jobs_file]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        start, log = time.time(), self.path("logs", f"{name}.log")
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
            for line in proc.stdout:  # the jobs' own output goes to their logs; the runner's lines are echoed
                f.write(line)
                if line.startswith("[jobs]"):
                    print(f"[{self.tag}]   {line[7:].rstrip()}", flush=True)
            proc.wait()
        if proc.returncode != 0:
            self._launch_failed(name, todo, proc.returncode, log)
        print(f"[{self.tag}] {name:<10} {len(todo)} jobs in {time.time() - start:.0f} s", flush=True)

    def run_each(self, name, jobs):
        """Run ``jobs`` (``job``'s dicts) not done yet one after another, each as its own ``python -m`` process (a Ray
        job starts its own workers, so it cannot share a torchrun launch); its output to its log, its wall seconds
        into its done marker. Stops at the first failure with that job's log tail."""
        todo = [j for j in jobs if not os.path.exists(j["done"])]
        print(f"[{self.tag}] {name:<10} {len(todo)} of {len(jobs)} jobs to run", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        for job in todo:
            os.makedirs(os.path.dirname(job["log"]), exist_ok=True)
            print(f"[{self.tag}]   {job['name']}: {job['module']} ...", flush=True)
            start = time.time()
            with open(job["log"], "w") as f:
                returncode = subprocess.run([sys.executable, "-m", job["module"], *job["args"]], stdout=f,
                                            stderr=subprocess.STDOUT, env=env).returncode
            if returncode != 0:
                self._launch_failed(name, [job], returncode, job["log"])
            seconds = round(time.time() - start, 1)
            os.makedirs(os.path.dirname(job["done"]), exist_ok=True)
            with open(job["done"], "w") as f:
                f.write(f"{seconds}\n")
            print(f"[{self.tag}]   {job['name']}: done in {seconds:.0f} s", flush=True)

    def _launch_failed(self, name, todo, returncode, log):
        """Stop with the first unfinished job's log tail (the launch's own log when that job wrote none)."""
        failed = next((j for j in todo if not os.path.exists(j["done"])), None)
        where = failed["log"] if failed and os.path.exists(failed["log"]) else log
        with open(where) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"[{self.tag}] launch {name} failed (exit {returncode}) at job "
                         f"{failed['name'] if failed else '?'}; log: {where}\n{tail}")

    # --- the two modes --------------------------------------------------------------------------------
    def run(self):
        """The mode the flags chose: ``--sweep`` or the benchmark."""
        return self.run_sweep() if self.args.sweep else self.run_benchmark()

    def prepare(self):
        """Each seed's data (a stage per seed), then the spec's first stage."""
        for seed in self.seeds:
            self.stage(f"data s{seed}", lambda seed=seed: self.spec.make_data(self, seed),
                       self.seed_path(seed, "done", "data.done"))
        self.spec.stage1(self)

    def run_benchmark(self) -> dict:
        """Every method at its tuned setting on every seed, evaluated on the test prompts; the report. Returns the
        metrics document (metrics.json)."""
        start = time.time()
        self.prepare()
        self.spec.train(self, {m: (m, self.settings[m]) for m in self.methods}, snapshots=True,
                        launch=self.spec.POLICY_LAUNCH)
        for seed in self.seeds:
            def evaluate(seed=seed):
                doc = self.spec.evaluate(self, seed)
                with open(self.seed_path(seed, "evaluation.json"), "w") as f:
                    json.dump(doc, f, indent=1)
            self.stage(f"eval s{seed}", evaluate, self.seed_path(seed, "done", "evaluate.done"))
        print(f"[{self.tag}] report     ...", flush=True)
        metrics = self.spec.report(self, time.time() - start)
        bad = non_finite(metrics)
        if bad:
            raise SystemExit(f"[{self.tag}] non-finite metrics: {bad}")
        print(f"[{self.tag}] finished in {time.time() - start:.0f} s. Report: {self.path('report.md')}")
        with open(self.path("report.md")) as f:
            print("".join(f.readlines()[:40]))
        return metrics

    def run_sweep(self) -> dict:
        """Every method at every grid point on the first seed, scored on the validation prompts; the best point of
        each method by the spec's objective becomes its setting. Writes sweep.json (the ``--settings`` format)."""
        start = time.time()
        self.prepare()
        spec, seed = self.spec, self.seeds[0]
        runs = {spec.run_name(m, p): (m, p) for m in self.methods for p in spec.grid_points(m)}
        spec.train(self, runs, snapshots=False, launch="sweep")

        def evaluate():
            with open(self.seed_path(seed, "sweep_evaluation.json"), "w") as f:
                json.dump(spec.validate(self, seed, runs), f, indent=1)
        self.stage("sweep eval", evaluate, self.seed_path(seed, "done", "sweep_evaluation.done"))
        with open(self.seed_path(seed, "sweep_evaluation.json")) as f:
            final = json.load(f)
        result = {m: {point_label(p): final[spec.run_name(m, p)] for p in spec.grid_points(m)} for m in self.methods}
        settings = {m: max(spec.grid_points(m), key=lambda p: result[m][point_label(p)][spec.OBJECTIVE_KEY])
                    for m in self.methods}
        doc = {"grid": spec.GRID, "objective": spec.OBJECTIVE, "seed": seed, **spec.sweep_context(self),
               "settings": settings,
               "validation": {m: {c: spec.sweep_entry(v) for c, v in result[m].items()} for m in self.methods},
               "wall_time_s": round(time.time() - start, 1)}
        with open(self.path("sweep.json"), "w") as f:
            json.dump(doc, f, indent=1)
        print(f"[{self.tag}] sweep finished in {time.time() - start:.0f} s: {self.path('sweep.json')}")
        for m in self.methods:
            row = "  ".join(f"{c}: {v[spec.OBJECTIVE_KEY]:+.3f}" for c, v in result[m].items())
            print(f"  {m:<12} best {settings[m]}   {row}")
        return doc


def sft_job(bench, seed, name, base, dataset, epochs):
    """OpenRLHF SFT of the base model at ``base`` on the message rows of ``dataset`` (lr 3e-3): a run's start model."""
    return bench.job(seed, name, "openrlhf.cli.train_sft", [
        "--model.model_name_or_path", base, "--data.dataset", dataset, "--data.input_key", "messages",
        *COMMON_TRAIN, *CHAT, "--train.max_epochs", str(epochs), "--adam.lr", "3e-3",
        "--ckpt.output_dir", bench.seed_path(seed, "models", name), "--ckpt.path", bench.seed_path(seed, "ckpt", name),
        "--train.seed", str(seed)])
