"""Evaluate HF checkpoints on preference pairs and on generations.

``python -m openrlhf_sepo.cli.evaluate --models sft=PATH,dpo=PATH,sepo=PATH [--baseline sft] ...``
(also through ``python -m openrlhf_sepo.cpu openrlhf_sepo.cli.evaluate ...``). Plain single process, no
DeepSpeed: under a launcher only rank 0 evaluates. docs/evaluate.md lists every flag and output key.

The front door of ``openrlhf_sepo.evaluation`` (the metrics, which know no task): it parses the flags, makes one
``evaluate_models`` call and returns an exit code. ``--reward ground_truth`` is where a task enters: the
embedded key-word task's truth (``openrlhf_sepo.tiny.ground_truth_reward``) and answer template
(``tiny.is_well_formed``) become ``evaluate_models``' ``reward_fn`` and ``format_fn``. The library's names
stay importable from here, as before it moved.
"""

import argparse
import dataclasses
import json
import os
import sys

from openrlhf_sepo import evaluation
from openrlhf_sepo.evaluation import (  # noqa: F401  (re-exported: this module was their home)
    DTYPES,
    DataFlags,
    EvaluationInputError,
    GenFlags,
    default_device,
    format_table,
    generate,
    load_policy,
    load_reward_model,
    load_rows,
    pairwise_accuracy,
    preference_prompts,
    render_prompt,
    response_logprob_sums,
    reward_model_rewards,
    win_rate,
)
from openrlhf_sepo.hh import PROMPT_SPLITS, marker_arg
from openrlhf_sepo.tiny import ground_truth_rewards, well_formed  # noqa: F401  (the task's scorers)

GROUND_TRUTH = "ground_truth"


def format_validity(responses) -> float:
    """mean_i 1[``openrlhf_sepo.tiny.is_well_formed``(response_i)]: the share of responses that follow the
    embedded task's answer template (NaN only for no responses)."""
    return sum(well_formed(responses)) / len(responses) if responses else float("nan")


def evaluate_models(models: dict, baseline: str = None, data: DataFlags = None, gen: GenFlags = None,
                    reward: str = None, **kwargs) -> dict:
    """``openrlhf_sepo.evaluation.evaluate_models`` with this CLI's ``--reward``: ``reward="ground_truth"``
    scores generations with the embedded task (``reward_fn=ground_truth_rewards``, ``format_fn=well_formed``,
    reported as ``"ground_truth"``); every other keyword is the library's."""
    if reward is not None and reward != GROUND_TRUTH:
        raise EvaluationInputError(
            f"--reward must be {GROUND_TRUTH!r} (or use --reward.model_name_or_path), got {reward!r}"
        )
    if reward == GROUND_TRUTH:
        kwargs.update(reward_fn=ground_truth_rewards, format_fn=well_formed, reward_name=GROUND_TRUTH)
    return evaluation.evaluate_models(models, baseline, data, gen, **kwargs)


def parse_models(spec: str) -> dict:
    """``"sft=PATH,dpo=PATH"`` -> ``{"sft": PATH, "dpo": PATH}`` (order kept); a bare PATH is named by its
    directory name."""
    models = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, path = item.split("=", 1) if "=" in item else (os.path.basename(item.rstrip("/")), item)
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise EvaluationInputError(f"--models: {item!r} is not NAME=PATH")
        if name in models:
            raise EvaluationInputError(f"--models: name {name!r} given twice")
        models[name] = path
    return models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", required=True, help="NAME=PATH[,NAME=PATH...]: HF checkpoints to evaluate")
    p.add_argument("--baseline", default=None, help="NAME of the win-rate reference (default: the first model)")
    p.add_argument("--output", default=None, help="JSON file for the full report")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward / generate call")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--local_rank", type=int, default=-1, help="accepted from launchers; evaluation is 1 process")
    p.add_argument("--ds.param_dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--ds.attn_implementation", default="sdpa", help="eager, sdpa, flash_attention_2, ...")
    d = DataFlags()
    p.add_argument("--data.dataset", default=d.dataset, help="preference data, as for openrlhf.cli.train_dpo")
    p.add_argument("--data.dataset_split", default=d.dataset_split)
    p.add_argument("--data.max_samples", type=int, default=d.max_samples)
    p.add_argument("--data.prompt_key", default=d.prompt_key)
    p.add_argument("--data.chosen_key", default=d.chosen_key)
    p.add_argument("--data.rejected_key", default=d.rejected_key)
    p.add_argument("--data.input_template", default=d.input_template)
    p.add_argument("--data.apply_chat_template", action="store_true", default=False)
    p.add_argument("--data.tokenizer_chat_template", default=d.tokenizer_chat_template)
    p.add_argument("--data.max_len", type=int, default=d.max_len)
    p.add_argument("--data.prompt_split", default=d.prompt_split, choices=PROMPT_SPLITS,
                   help="rows with no prompt column (HH-RLHF shape): split each pair into the shared prompt and "
                        "the final answers (openrlhf_sepo.hh.split_prompt); none: as OpenRLHF")
    p.add_argument("--data.assistant_marker", type=marker_arg, default=d.assistant_marker,
                   help="the text that opens an assistant turn, for --data.prompt_split (\\n typed here is a newline)")
    g = GenFlags()
    p.add_argument("--gen.prompts", default=g.prompts, help="held-out prompts (default: the --data.dataset prompts)")
    p.add_argument("--gen.prompt_key", default=g.prompt_key)
    p.add_argument("--gen.split", default=g.split)
    p.add_argument("--gen.n_prompts", type=int, default=g.n_prompts, help="first N prompts; 0 skips generation")
    p.add_argument("--gen.max_new_tokens", type=int, default=g.max_new_tokens)
    p.add_argument("--gen.greedy", action="store_true", default=False)
    p.add_argument("--gen.temperature", type=float, default=g.temperature)
    p.add_argument("--gen.top_p", type=float, default=g.top_p)
    p.add_argument("--gen.seed", type=int, default=g.seed)
    p.add_argument("--gen.n_samples", type=int, default=g.n_samples, help="generations kept per model in --output")
    p.add_argument("--reward", dest="reward.source", default=None, choices=[GROUND_TRUTH],
                   help="score generations with openrlhf_sepo.tiny.ground_truth_reward")
    p.add_argument("--reward.model_name_or_path", default=None, help="score generations with an OpenRLHF RM")
    return p


def _section(args, prefix: str, cls):
    return cls(**{f.name: getattr(args, f"{prefix}.{f.name}") for f in dataclasses.fields(cls)})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one evaluating process is enough; other launcher ranks have nothing to do
    import datasets
    import transformers

    # Per-model loading and per-batch mapping bars would bury the table.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        report = evaluate_models(
            parse_models(args.models),
            baseline=args.baseline,
            data=_section(args, "data", DataFlags),
            gen=_section(args, "gen", GenFlags),
            reward=getattr(args, "reward.source"),
            reward_model_path=getattr(args, "reward.model_name_or_path"),
            param_dtype=getattr(args, "ds.param_dtype"),
            attn_implementation=getattr(args, "ds.attn_implementation"),
            device=args.device,
            batch_size=args.batch_size,
        )
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, allow_nan=True)
        print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
