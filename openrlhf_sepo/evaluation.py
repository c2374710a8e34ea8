"""Evaluation metrics for HF checkpoints: preference pairs, generations, and the sampled KL to a baseline.

The library behind ``python -m openrlhf_sepo.cli.evaluate`` (docs/evaluate.md). It knows no task: generations
are scored by the ``reward_fn`` / ``format_fn`` the caller passes to ``evaluate_models`` (the CLI passes the
embedded key-word task's, ``openrlhf_sepo.tiny``), or by an OpenRLHF reward model. Plain single process, no
DeepSpeed.

Metrics per model:

- ``pairwise_accuracy`` = mean over pairs of 1[ u(y_w) > u(y_l) ], with u(y) = mean over response tokens
  (EOS included, prompt excluded) of log pi(y_t | x, y_<t): the length-normalised log-prob. ``mean_margin`` =
  mean of u(y_w) - u(y_l). Pairs are tokenized by OpenRLHF's ``RewardDataset(is_dpo=True)``, so exactly as
  ``openrlhf.cli.train_dpo`` sees them with the same ``--data.*`` flags.
- ``reward_mean`` = mean reward of one generation per prompt, scored by ``reward_fn`` or by an OpenRLHF reward
  model on prompt + response tokenized by ``RewardDataset(is_dpo=False)`` (as ``openrlhf.cli.train_rm`` saw
  its pairs).
- ``win_rate_vs_<baseline>`` = mean over prompts of 1[r_model > r_base] + 0.5 * 1[r_model == r_base].
- ``format_validity`` (with ``format_fn`` only) = share of the model's generations that ``format_fn`` accepts.
- ``kl_to_<baseline>`` = mean over prompts of sum over the generated response tokens of
  log pi(y_t | x, y_<t) - log pi_base(y_t | x, y_<t): the Monte-Carlo estimate of KL(pi || pi_base) from the
  model's own samples, unbiased only when they are drawn from pi itself (temperature 1, top_p 1, not greedy).
"""

import dataclasses
import functools
import json
import math
from typing import Callable, Optional

import openrlhf_sepo  # noqa: F401  (flash-attn kernel placeholder, before anything imports OpenRLHF)
from openrlhf_sepo.rows import DataStrategy
from openrlhf_sepo.hh import DEFAULT_MARKER, PROMPT_SPLITS, split_prompt
from openrlhf_sepo.scoring import label_logprobs

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class EvaluationInputError(ValueError):
    """A bad flag or input row, found before any compute; the message names the flag or the row."""


@dataclasses.dataclass
class DataFlags:
    """The ``--data.*`` flags of ``openrlhf.cli.train_dpo`` that decide which pairs are read and how they are
    tokenized; defaults are OpenRLHF's. The field names are what ``RewardDataset`` reads from ``args.data``."""

    dataset: Optional[str] = None
    dataset_split: str = "train"
    max_samples: int = 1000000
    prompt_key: Optional[str] = None
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    input_template: Optional[str] = None
    apply_chat_template: bool = False
    tokenizer_chat_template: Optional[str] = None
    max_len: int = 512
    # Rows with no prompt column (HH-RLHF shape): split each pair into prompt + final answers (openrlhf_sepo.hh).
    prompt_split: str = "none"
    assistant_marker: str = DEFAULT_MARKER


@dataclasses.dataclass
class GenFlags:
    """The ``--gen.*`` flags: which prompts are answered and how."""

    prompts: Optional[str] = None  # data file with one prompt per row; None: the preference data's prompts
    prompt_key: str = "prompt"
    split: str = "train"
    n_prompts: int = 64  # 0 disables generation
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42
    n_samples: int = 3  # generations kept in the output per model


def load_rows(path: str, split: str = "train", max_samples: int = 1000000):
    """Rows of any data set OpenRLHF's ``blending_datasets`` reads (jsonl, json, parquet, a saved dataset
    directory, a hub name; comma-separated for several), as a ``datasets.Dataset``."""
    from openrlhf.datasets.utils import blending_datasets

    rows = blending_datasets(path, None, DataStrategy(DataFlags(), quiet=True), max_count=max_samples, dataset_split=split)
    return rows.select(range(min(max_samples, len(rows))))


def _as_dataset(rows):
    from datasets import Dataset

    return rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))


def _reward_dataset(rows, tokenizer, data: DataFlags, is_dpo: bool):
    from openrlhf.datasets import RewardDataset

    # One process: evaluation sets are small, and worker start-up costs more than it saves on few cores.
    return RewardDataset(
        _as_dataset(rows), tokenizer, data.max_len, DataStrategy(data, quiet=True), data.input_template, is_dpo=is_dpo,
        num_processors=1,
    )


def _split_rows(rows, data: DataFlags):
    """``--data.prompt_split``: (rows as ``{"prompt", "chosen", "rejected"}``, the flags that read them with
    OpenRLHF's prompt-key path, the indices of rows that share no prompt and are left out). Unchanged when
    the split is ``none``."""
    if data.prompt_split == "none":
        return rows, data, []
    split, unsplit = [], []
    for i, row in enumerate(rows):
        parts = split_prompt(row[data.chosen_key], row[data.rejected_key], data.prompt_split, data.assistant_marker)
        if parts is None:
            unsplit.append(i)
        else:
            split.append(dict(zip(("prompt", "chosen", "rejected"), parts)))
    return split, dataclasses.replace(data, prompt_key="prompt", chosen_key="chosen", rejected_key="rejected"), unsplit


def _batches(dataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        yield dataset.collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def _device_of(model):
    return next(model.parameters()).device


def load_policy(path: str, param_dtype: str = "fp32", attn_implementation: str = "sdpa", device=None):
    """(causal LM in eval mode on ``device``, tokenizer with left padding) for an HF checkpoint."""
    import torch
    from openrlhf.utils import get_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, DTYPES[param_dtype]), attn_implementation=attn_implementation,
        trust_remote_code=True,
    )
    model.to(device or default_device()).eval()
    return model, get_tokenizer(path, model, "left")


def load_reward_model(path: str, param_dtype: str = "fp32", attn_implementation: str = "sdpa", device=None):
    """(OpenRLHF reward model in eval mode, tokenizer) via ``get_llm_for_sequence_regression(path, "reward")``.

    ``forward(input_ids, attention_mask)`` returns one scalar per row: the value head at the last attended
    token. The mean/std that ``train_rm`` stores in config.json are not applied (normalize_reward=False).
    """
    import torch
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_tokenizer

    # OpenRLHF's param_dtype knows only bf16/fp16; transformers gives `dtype` precedence over the
    # `torch_dtype` OpenRLHF passes, so fp32 (the CPU default) arrives through `dtype`.
    model = get_llm_for_sequence_regression(
        path, "reward", param_dtype="bf16", attn_implementation=attn_implementation,
        dtype=getattr(torch, DTYPES[param_dtype]),
    )
    model.to(device or default_device()).eval()
    return model, get_tokenizer(path, model, "left")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _response_logps(model, ids, mask, prompt_lens):
    """(log pi(ids[t+1] | ids[<=t]) at the response targets and 0 elsewhere, the target mask), both [B, T-1].

    ids / mask: a right-padded batch; prompt_lens: per row, the tokens before the response. A target is
    ids[t+1] with t+1 >= prompt length and attended. Log-probs from the logits in fp32 (``scoring.label_logprobs``).
    """
    import torch

    device = _device_of(model)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(ids, attention_mask=mask).logits.float()
    logps = label_logprobs(logits[:, :-1], ids[:, 1:])  # [B, T-1]: position t is log p(ids[t+1])
    positions = torch.arange(1, ids.shape[1], device=device)
    targets = mask[:, 1:].bool() & (positions >= torch.tensor(prompt_lens, device=device)[:, None])
    return logps * targets, targets


def pairwise_accuracy(model, tokenizer, rows, data: DataFlags = None, batch_size: int = 8) -> dict:
    """Length-normalised log-prob preference of ``model`` on preference ``rows``.

    rows: a ``datasets.Dataset`` or a list of dicts in the shape ``data`` (``--data.*`` flags) describes.
    u(y) = mean_{t in response} log pi(y_t | x, y_<t), response = tokens after the prompt, EOS included.
    Returns ``{"pairwise_accuracy": mean 1[u(y_w) > u(y_l)], "mean_margin": mean u(y_w) - u(y_l),
    "n_pairs": pairs left after OpenRLHF's filter of prompts longer than max_len - 2, "margins": [...]}``;
    with ``data.prompt_split`` also ``"n_no_shared_prompt"``: rows left out because their two sides share no
    prompt (``openrlhf_sepo.hh.split_prompt``).
    """
    import torch

    data = data or DataFlags()
    rows, flags, unsplit = _split_rows(rows, data)
    dataset = _reward_dataset(rows, tokenizer, flags, is_dpo=True)
    margins = []
    with torch.no_grad():
        for chosen_ids, c_mask, reject_ids, r_mask, prompt_lens in _batches(dataset, batch_size):
            means = []
            for ids, mask in ((chosen_ids, c_mask), (reject_ids, r_mask)):
                logps, targets = _response_logps(model, ids, mask, prompt_lens)
                means.append(logps.sum(-1) / targets.sum(-1))
            margins += (means[0] - means[1]).tolist()
    n = len(margins)
    return {
        "pairwise_accuracy": sum(m > 0 for m in margins) / n if n else float("nan"),
        "mean_margin": sum(margins) / n if n else float("nan"),
        "n_pairs": n,
        "margins": margins,
        **({"n_no_shared_prompt": len(unsplit)} if data.prompt_split != "none" else {}),
    }


def render_prompt(tokenizer, prompt, data: DataFlags) -> str:
    """The text a policy continues: a user prompt (string) or a message list through the chat template
    with the generation prompt (``--data.apply_chat_template``), else ``--data.input_template`` or as is."""
    if data.apply_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(
            messages, chat_template=data.tokenizer_chat_template, tokenize=False, add_generation_prompt=True
        )
    if not isinstance(prompt, str):
        raise EvaluationInputError("a message-list prompt needs --data.apply_chat_template")
    return data.input_template.format(prompt) if data.input_template else prompt


def generate(
    model, tokenizer, prompts, data: DataFlags = None, gen: GenFlags = None, batch_size: int = 8,
    return_ids: bool = False,
):
    """One response (decoded text, special tokens dropped) per prompt, batched with left padding.

    Greedy with ``gen.greedy``, else sampling at ``gen.temperature`` / ``gen.top_p`` (no top-k) from seed
    ``gen.seed`` (the same seed for every model); other settings in a checkpoint's generation_config.json
    (e.g. a repetition_penalty) still apply. Stops at the tokenizer's EOS or after ``gen.max_new_tokens``.
    Sets ``tokenizer.padding_side = "left"``: a decoder-only model continues the last real token.
    Returns the texts, or with ``return_ids`` ``(texts, prompt_ids, response_ids)``: per prompt, the ids the
    model was given (left padding removed) and the generated ids up to and including the first EOS (all
    ``max_new_tokens`` of them when there is none), as lists of ints.
    """
    import torch

    data, gen = data or DataFlags(), gen or GenFlags()
    tokenizer.padding_side = "left"
    device = _device_of(model)
    # top_k=0: transformers' default top_k=50 would otherwise truncate the distribution the flags describe.
    sampling = {} if gen.greedy else {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": 0}
    torch.manual_seed(gen.seed)
    responses, prompt_ids, response_ids = [], [], []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            texts = [render_prompt(tokenizer, p, data) for p in prompts[start : start + batch_size]]
            # The chat template already holds any BOS, as in OpenRLHF's datasets.
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch, max_new_tokens=gen.max_new_tokens, do_sample=not gen.greedy,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            responses += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            if return_ids:
                for ids, mask, new in zip(batch["input_ids"], batch["attention_mask"], new_tokens.tolist()):
                    prompt_ids.append(ids[mask.bool()].tolist())
                    # A finished row is filled with pad after its EOS (pad may equal EOS): cut at the first EOS.
                    end = new.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in new else len(new)
                    response_ids.append(new[:end])
    return (responses, prompt_ids, response_ids) if return_ids else responses


def response_logprob_sums(model, prompt_ids, response_ids, batch_size: int = 8) -> list:
    """S(y | x) = sum_t log pi(y_t | x, y_<t) over every response token, one float per (prompt, response).

    prompt_ids / response_ids: lists of token-id lists, unpadded (as ``generate(..., return_ids=True)`` gives
    them). Each prompt + response is one row of a right-padded batch; log-probs come from the logits in fp32.
    KL(pi || pi_base) ~= mean_i S_pi(y_i | x_i) - S_base(y_i | x_i) for y_i sampled from pi
    (``evaluate_models``' ``kl_to_<baseline>``).
    """
    import torch
    from openrlhf.utils.utils import zero_pad_sequences

    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"one response per prompt: {len(prompt_ids)} prompts, {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token: the first response token is conditioned on it")
    sums = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            prompts, responses = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
            rows = [torch.tensor(p + r) for p, r in zip(prompts, responses)]
            # Right padding: real tokens keep positions 0..L-1, as under generate's left padding + position ids.
            ids = zero_pad_sequences(rows, side="right", stack=True)
            mask = zero_pad_sequences([torch.ones_like(row) for row in rows], side="right", stack=True)
            logps, _ = _response_logps(model, ids, mask, [len(p) for p in prompts])
            sums += logps.sum(-1).tolist()
    if any(math.isnan(s) for s in sums):
        # NaN logits (fp16 overflow, a broken checkpoint) would otherwise pass into the KL unnoticed.
        raise FloatingPointError("NaN response log-probs: the model's logits hold NaN (try --ds.param_dtype fp32)")
    return sums


def reward_model_rewards(reward_model, tokenizer, prompts, responses, data: DataFlags = None, batch_size=8):
    """One scalar per (prompt, response) from an OpenRLHF reward model, on the text ``train_rm`` would build.

    With ``--data.apply_chat_template`` the row is the conversation [user prompt, assistant response] (a
    message-list prompt is used as is); otherwise prompt (through ``--data.input_template``) + response.
    ``RewardDataset(is_dpo=False)`` then strips, appends EOS, truncates at ``max_len`` and left-pads.
    """
    import torch

    data = data or DataFlags()
    if data.apply_chat_template:
        rows = []
        for prompt, response in zip(prompts, responses):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            messages = messages + [{"role": "assistant", "content": response}]
            rows.append({"chosen": messages, "rejected": messages})
        flags = dataclasses.replace(data, prompt_key=None, chosen_key="chosen", rejected_key="rejected")
    else:
        rows = [{"prompt": p, "chosen": r, "rejected": r} for p, r in zip(prompts, responses)]
        flags = dataclasses.replace(data, prompt_key="prompt", chosen_key="chosen", rejected_key="rejected")
    dataset = _reward_dataset(rows, tokenizer, flags, is_dpo=False)
    device = _device_of(reward_model)
    rewards = []
    with torch.no_grad():
        for ids, mask, _, _, _ in _batches(dataset, batch_size):  # chosen == rejected: score one copy
            rewards += reward_model(ids.to(device), attention_mask=mask.to(device)).float().tolist()
    return rewards


def win_rate(rewards, baseline_rewards) -> float:
    """mean_i 1[r_i > b_i] + 0.5 * 1[r_i == b_i]: prompts paired by position."""
    if len(rewards) != len(baseline_rewards):
        raise ValueError(f"win rate needs one reward per prompt for both: {len(rewards)} vs {len(baseline_rewards)}")
    if not rewards:
        return float("nan")
    return sum(1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(rewards, baseline_rewards)) / len(rewards)


def preference_prompts(rows, data: DataFlags) -> list:
    """The distinct prompts of preference rows, in order: ``row[--data.prompt_key]``, or with
    ``--data.apply_chat_template`` and no prompt key the chosen conversation without its last turn, or with
    ``--data.prompt_split`` the prompt it splits off (rows that share none are left out)."""
    rows, data, _ = _split_rows(rows, data)
    prompts, seen = [], set()
    for i, row in enumerate(rows):
        if data.prompt_key:
            prompt = row[data.prompt_key]
        elif data.apply_chat_template and isinstance(row[data.chosen_key], list):
            prompt = row[data.chosen_key][:-1]
        else:
            raise EvaluationInputError(
                f"row {i} of --data.dataset has no prompt: give --data.prompt_key, or --data.apply_chat_template "
                "with message-list responses, or held-out prompts with --gen.prompts"
            )
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts


def _check_checkpoint(path: str, flag: str, data: DataFlags, policy: bool):
    """Fail before any compute when a checkpoint cannot be read, is a reward model where a policy is needed
    (transformers would silently give it a random LM head), or lacks a chat template it needs. Returns the
    checkpoint's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except Exception as e:  # OSError for a missing path, ValueError for a broken config, ...
        raise EvaluationInputError(f"{flag}: cannot load a model and tokenizer from {path!r}: {e}") from e
    if policy and set(getattr(config, "architectures", None) or []) & {"RewardModel", "CriticModel"}:
        raise EvaluationInputError(
            f"{flag}: {path!r} is an OpenRLHF reward/critic model, not a causal LM; "
            "pass it as --reward.model_name_or_path"
        )
    if data.apply_chat_template and not data.tokenizer_chat_template and not tokenizer.chat_template:
        raise EvaluationInputError(
            f"{flag}: the tokenizer at {path!r} has no chat template, but --data.apply_chat_template is set; "
            "give --data.tokenizer_chat_template or drop --data.apply_chat_template"
        )
    return tokenizer


def _check_rows(rows, keys: dict, where: str):
    if len(rows) == 0:
        raise EvaluationInputError(f"{where} has no rows")
    for flag, key in keys.items():
        if key and key not in rows.column_names:
            raise EvaluationInputError(f"{flag} {key!r} is not a column of {where} (columns: {rows.column_names})")


def _check_flags(models, baseline, data, gen, reward_fn, reward_model_path, param_dtype) -> str:
    """The checks that need no file: raises ``EvaluationInputError`` naming the flag; returns the baseline."""
    if not models:
        raise EvaluationInputError("--models: give at least one NAME=PATH")
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise EvaluationInputError(f"--baseline {baseline!r} is not one of --models ({', '.join(models)})")
    if param_dtype not in DTYPES:
        raise EvaluationInputError(f"--ds.param_dtype must be one of {sorted(DTYPES)}, got {param_dtype!r}")
    if data.input_template and "{}" not in data.input_template:
        raise EvaluationInputError(
            f"--data.input_template must contain '{{}}' for the prompt, got {data.input_template!r}"
        )
    if data.prompt_split not in PROMPT_SPLITS:
        raise EvaluationInputError(f"--data.prompt_split must be one of {PROMPT_SPLITS}, got {data.prompt_split!r}")
    if data.prompt_split != "none" and data.prompt_key:
        raise EvaluationInputError(
            f"--data.prompt_split {data.prompt_split} makes the prompt from chosen and rejected: drop "
            f"--data.prompt_key {data.prompt_key!r} (or use --data.prompt_split none)"
        )
    generating = gen.n_prompts > 0
    if not data.dataset and not (generating and gen.prompts):
        raise EvaluationInputError(
            "nothing to evaluate: give --data.dataset (pairs) and/or --gen.prompts (generation)"
        )
    # The flags are the CLI's; a Python caller passes reward_fn (what --reward ground_truth supplies) instead.
    if generating and reward_fn is None and reward_model_path is None:
        raise EvaluationInputError(
            "generations need a reward source: --reward ground_truth or --reward.model_name_or_path PATH "
            "(in Python: reward_fn or reward_model_path), or --gen.n_prompts 0 to skip generation"
        )
    if reward_fn is not None and reward_model_path is not None:
        raise EvaluationInputError("give either --reward ground_truth or --reward.model_name_or_path, not both")
    if generating and not gen.greedy and not gen.temperature > 0:
        raise EvaluationInputError(
            f"--gen.temperature must be > 0 for sampling (or use --gen.greedy), got {gen.temperature}"
        )
    return baseline


def _read_inputs(data: DataFlags, gen: GenFlags):
    """(preference rows or None, generation prompts or None), each checked for the columns the flags name."""
    pairs = prompts = None
    generating = gen.n_prompts > 0
    if data.dataset:
        try:
            pairs = load_rows(data.dataset, data.dataset_split, data.max_samples)
        except Exception as e:
            raise EvaluationInputError(f"--data.dataset: cannot read {data.dataset!r}: {e}") from e
        _check_rows(pairs, {"--data.chosen_key": data.chosen_key, "--data.rejected_key": data.rejected_key,
                            "--data.prompt_key": data.prompt_key}, f"--data.dataset {data.dataset}")
    if generating and gen.prompts:
        try:
            prompt_rows = load_rows(gen.prompts, gen.split)
        except Exception as e:
            raise EvaluationInputError(f"--gen.prompts: cannot read {gen.prompts!r}: {e}") from e
        _check_rows(prompt_rows, {"--gen.prompt_key": gen.prompt_key}, f"--gen.prompts {gen.prompts}")
        prompts = list(prompt_rows[gen.prompt_key])[: gen.n_prompts]
    elif generating:
        prompts = preference_prompts(pairs, data)[: gen.n_prompts]
    if prompts is not None and not data.apply_chat_template:
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise EvaluationInputError(f"prompt {i} is a message list: it needs --data.apply_chat_template")
    return pairs, prompts


@dataclasses.dataclass
class _Generations:
    """Per model name: its responses, its (prompt ids, response ids), the log-prob sums of its responses under
    itself (``own``) and under the baseline (``base``; absent when the vocabularies differ)."""

    texts: dict = dataclasses.field(default_factory=dict)
    ids: dict = dataclasses.field(default_factory=dict)
    own: dict = dataclasses.field(default_factory=dict)
    base: dict = dataclasses.field(default_factory=dict)


def _run_policies(models, baseline, comparable, pairs, prompts, data, gen, load, batch_size):
    """Load each policy once, in order: its pairwise metrics, its generations and their log-prob sums under
    itself and, while the baseline is loaded, under the baseline. Returns ({name: metrics}, ``_Generations``)."""
    results, g = {}, _Generations()

    def score_under_baseline(baseline_model):
        for other in g.ids.keys() - g.base.keys():
            if other == baseline:
                g.base[other] = g.own[other]
            elif comparable[other]:
                g.base[other] = response_logprob_sums(baseline_model, *g.ids[other], batch_size)

    for name, path in models.items():
        model, tokenizer = load(path)
        metrics = {"path": path}
        if pairs is not None:
            scores = pairwise_accuracy(model, tokenizer, pairs, data, batch_size)
            metrics.update({k: scores[k] for k in ("pairwise_accuracy", "mean_margin", "n_pairs", "n_no_shared_prompt")
                            if k in scores})
        if prompts is not None:
            g.texts[name], *g.ids[name] = generate(model, tokenizer, prompts, data, gen, batch_size, return_ids=True)
            g.own[name] = response_logprob_sums(model, *g.ids[name], batch_size)
            if name == baseline:
                score_under_baseline(model)
        results[name] = metrics
        del model
    if any(comparable[n] and n not in g.base for n in g.ids):  # models after the baseline: load it once more
        model, _ = load(models[baseline])
        score_under_baseline(model)
        del model
    return results, g


def _generation_metrics(g: _Generations, name, rewards, reward_source, prompts, baseline, n_samples, format_fn):
    """One model's generation metrics (a dict); ``rewards``: {model name: one reward per prompt}."""
    flags = None if format_fn is None else [bool(f) for f in format_fn(g.texts[name])]
    for what, values in (("reward_fn", rewards[name]), ("format_fn", flags)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{what} must give one value per response: {len(values)} for {name}'s {len(prompts)}")
    samples = [
        {"prompt": p, "response": r, "reward": s}
        for p, r, s in list(zip(prompts, g.texts[name], rewards[name]))[:n_samples]
    ]
    metrics = {
        "reward_mean": sum(rewards[name]) / len(prompts) if prompts else float("nan"),
        "n_prompts": len(prompts),
        "reward_source": reward_source,
        "samples": samples,
        f"win_rate_vs_{baseline}": win_rate(rewards[name], rewards[baseline]),
        f"kl_to_{baseline}": (
            sum(o - b for o, b in zip(g.own[name], g.base[name])) / len(prompts) if name in g.base else None
        ),
    }
    if flags is not None:
        metrics["format_validity"] = sum(flags) / len(flags) if flags else float("nan")
        for sample, flag in zip(samples, flags):
            sample["well_formed"] = flag
    return metrics


def _with_prompts(fn, prompts, responses):
    return fn(responses, prompts)


def evaluate_models(
    models: dict,
    baseline: str = None,
    data: DataFlags = None,
    gen: GenFlags = None,
    *,
    reward_fn: Callable[[list], list] = None,
    format_fn: Callable[[list], list] = None,
    reward_name: str = "reward_fn",
    with_prompts: bool = False,
    reward_model_path: str = None,
    param_dtype: str = "fp32",
    attn_implementation: str = "sdpa",
    device: str = None,
    batch_size: int = 8,
) -> dict:
    """Evaluate every checkpoint in ``models`` ({name: HF path}, in order) and return the output document.

    Pairwise metrics run when ``data.dataset`` is set; generation runs when ``gen.n_prompts > 0`` on
    ``gen.prompts`` (else the preference data's prompts) and needs exactly one reward source:
    ``reward_fn(responses) -> rewards`` (a list of response texts in, one float per response out; reported as
    ``reward_source: reward_name``) or ``reward_model_path`` (an OpenRLHF reward model). ``format_fn(responses)
    -> flags`` (one bool per response: does it follow the task's answer template?), optional, adds
    ``format_validity`` (the share of True) to each model and ``well_formed`` to each sample. With
    ``with_prompts``, both are called as ``fn(responses, prompts)``, the prompts in the responses' order (a task
    whose right answer depends on the prompt). ``baseline``
    (default: the first model) is the reference of the win rates and of the KL. All inputs are checked before
    any model is loaded; a bad one raises ``EvaluationInputError`` (a ``ValueError``) naming its flag or row.

    With generation, each model's metrics get ``reward_mean``, ``win_rate_vs_<baseline>`` and
    ``kl_to_<baseline>`` = mean_i [S_pi(y_i | x_i) - S_base(y_i | x_i)] over the model's own responses y_i,
    S the ``response_logprob_sums`` (response tokens up to and including the first EOS, prompt as the
    model was given it). For y_i ~ pi this is an unbiased Monte-Carlo estimate of KL(pi || pi_base); at
    another temperature or top_p, or greedy, the samples come from another distribution and it is
    E_q[log pi - log pi_base], not a KL (it can be negative): the report says which in ``kl_unbiased``.
    The baseline scores its own responses with the sums it computed when generating (so exactly 0); it is
    loaded a second time, after the loop, only when later models' responses remain to score. A model whose
    tokenizer vocabulary differs from the baseline's gets ``kl_to_<baseline>: None`` (its ids mean other
    tokens to the baseline).
    Returns ``{"baseline", "reward_source", "kl_unbiased", "n_pairs", "n_prompts", "models": {name: metrics}}``.
    """
    data, gen = data or DataFlags(), gen or GenFlags()
    baseline = _check_flags(models, baseline, data, gen, reward_fn, reward_model_path, param_dtype)
    vocabs = {name: _check_checkpoint(path, f"--models {name}", data, policy=True).get_vocab()
              for name, path in models.items()}
    comparable = {name: vocab == vocabs[baseline] for name, vocab in vocabs.items()}  # for the KL
    if gen.n_prompts > 0 and reward_model_path:
        _check_checkpoint(reward_model_path, "--reward.model_name_or_path", data, policy=False)
    pairs, prompts = _read_inputs(data, gen)
    if with_prompts and prompts is not None:  # bind the prompts the responses answer, in order
        reward_fn = None if reward_fn is None else functools.partial(_with_prompts, reward_fn, prompts)
        format_fn = None if format_fn is None else functools.partial(_with_prompts, format_fn, prompts)

    load = lambda path: load_policy(path, param_dtype, attn_implementation, device)  # noqa: E731
    results, g = _run_policies(models, baseline, comparable, pairs, prompts, data, gen, load, batch_size)
    reward_source = kl_unbiased = None
    if prompts is not None:
        # Unbiased only for samples drawn from pi itself.
        kl_unbiased = not gen.greedy and gen.temperature == 1.0 and gen.top_p == 1.0
        if reward_fn is not None:
            reward_source = reward_name
            rewards = {name: list(reward_fn(r)) for name, r in g.texts.items()}
        else:
            reward_source = f"reward_model:{reward_model_path}"
            rm, rm_tokenizer = load_reward_model(reward_model_path, param_dtype, attn_implementation, device)
            rewards = {name: reward_model_rewards(rm, rm_tokenizer, prompts, r, data, batch_size)
                       for name, r in g.texts.items()}
        for name, metrics in results.items():
            metrics.update(_generation_metrics(g, name, rewards, reward_source, prompts, baseline, gen.n_samples,
                                               format_fn))
    return {
        "baseline": baseline,
        "reward_source": reward_source,
        "kl_unbiased": kl_unbiased,
        "n_pairs": next(iter(results.values())).get("n_pairs", 0),
        "n_prompts": len(prompts) if prompts is not None else 0,
        "models": results,
    }


def format_table(report: dict) -> str:
    """A compact text table: one row per model, one column per scalar metric present (``n/a``: a KL the
    baseline cannot score), and a footer that says when the KL column is not an unbiased KL estimate."""
    baseline = report["baseline"]
    columns = [c for c in ("pairwise_accuracy", "mean_margin", "reward_mean", f"win_rate_vs_{baseline}",
                           "format_validity", f"kl_to_{baseline}")
               if any(c in m for m in report["models"].values())]
    width = max(len("model"), *(len(n) for n in report["models"]))
    lines = ["  ".join([f"{'model':<{width}}", *(f"{c:>{max(len(c), 10)}}" for c in columns)])]

    def cell(value, column):
        return f"{'n/a' if value is None else format(value, '.4f'):>{max(len(column), 10)}}"

    for name, m in report["models"].items():
        cells = [cell(m.get(c, float("nan")), c) for c in columns]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    lines.append(f"pairs: {report['n_pairs']}  prompts: {report['n_prompts']}  reward: {report['reward_source']}")
    if report.get("kl_unbiased") is False:
        lines.append(f"kl_to_{baseline}: samples not drawn at temperature 1 / top_p 1: not an unbiased KL estimate")
    return "\n".join(lines)
