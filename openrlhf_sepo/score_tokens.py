"""The scoring engine of ``python -m openrlhf_sepo.cli.score_tokens`` (SePO step 3): ``score_dataset(args)``.

Every response token of a preference data set gets a score, fp32, the first response token and EOS included:

    scorer oracle_ref:  r(y_t) = log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)   (scoring.token_scores)
    scorer token_rm:    r(y_t) = act(head(h_t)), a learned token reward model (token_rm.py), h_t its last hidden
                        state at y_t
    policy.tokenizer:   oracle_ref scores on the oracle's tokens, mapped onto the policy tokenizer's ids (the ones
                        written) by character overlap, sums kept (token_map.py)

The rows are tokenized exactly as ``train_dpo`` tokenizes them (``rows.RowTokenizer``) and written to a scores dir
(``scores_dir``: the format, its shards and the resume protocol). Rows are cut into fixed shards of
``args.score.shard_size`` pairs; shard s is scored by rank s % world_size, so N ranks never overlap and a rerun skips
every shard already done: a killed run resumes where it stopped, with any world size.

The pipeline, per rank: ``prepare_shard`` reads a shard's rows, tokenizes them in one batch (``encode_many``), counts
its skips and cuts the kept pairs into length-sorted, host-padded batches; ``score_shard`` runs the forwards and the
statistics; the shard is written. Preparing runs ahead of the forward on one background thread (``prefetched``,
``--score.tokenize_ahead``, default 1 shard ahead; the first shard is prepared while the models load), so the
tokenizer is off the forward's critical path and the forward's only wait is ``tokenize_wait_s``. The batches are
exactly those of a shard prepared inline, so the scores are the same bits either way.

Everything that can be wrong with the flags, models and output dir is found before a model is loaded; such errors
are ``ScoringError`` (the CLI exits with their message).
"""

import argparse
import collections
import functools
import glob
import hashlib
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from openrlhf.datasets.utils import blending_datasets
from openrlhf.utils import get_tokenizer
from openrlhf.utils.utils import zero_pad_sequences

from openrlhf_sepo import scores_dir
from openrlhf_sepo.rows import CrossRowTokenizer, DataStrategy, RowTokenizer
from openrlhf_sepo.scoring import key_token_ranks, num_selected, token_scores, tokenizer_fingerprint
from openrlhf_sepo.skips import Skip, SkipCounter
from openrlhf_sepo.token_rm import checkpoint_settings, load_token_rm, token_rewards

SCORERS = ("oracle_ref", "token_rm")
SKIP_REASONS = (
    "missing_key",  # a prompt / chosen / rejected key absent or null
    "non_text",  # a value that is neither text nor a list of {"role", "content": str} messages
    "empty_response",  # chosen or rejected empty or whitespace-only
    "empty_prompt",  # prompt of 0 tokens: the first response token would have no context to be scored from
    "prompt_too_long",  # fewer than 2 response tokens left within --data.max_len
    "identical_responses",  # chosen and rejected tokenize to the same ids
    "no_shared_prompt",  # --data.prompt_split: the two sides share no prompt (openrlhf_sepo.hh.split_prompt)
    "mapping_failed",  # --policy.tokenizer: the oracle's tokens cannot be mapped onto the policy's (token_map.py)
)
SKIP_EXAMPLES_KEPT = 20  # per reason, with their messages, in the manifest
# Test hook: SIGKILL this process after it has written this many shards (simulates a crash mid-run).
KILL_AFTER_SHARDS_ENV = "SEPO_SCORE_KILL_AFTER_SHARDS"
# The manifest's formula per scorer; a token RM's z_t = value_head(h_t), h_t its last hidden state at y_t
# (it has seen x and y_<=t), act the activation it was trained with (token_rm.activation).
FORMULAS = {
    "oracle_ref": "score_t = log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t), fp32, every response token",
    "softplus": "score_t = softplus(1 - softplus(1 - z_t)), z_t = value_head(h_t) of the token RM at y_t "
                "(h_t has seen x, y_<=t), fp32, every response token",
    "sigmoid": "score_t = sigmoid(z_t), z_t = value_head(h_t) of the token RM at y_t (h_t has seen x, y_<=t), "
               "fp32, every response token",
}
TOKEN_MAPPING = ("character-overlap split, per-response sum preserved: each oracle token's score is split among the "
                 "policy tokens overlapping its characters, in proportion to the overlap; special tokens matched "
                 "from the end (EOS to EOS); see openrlhf_sepo/token_map.py")


class ScoringError(ValueError):
    """Flags, models or an output dir that cannot make the scores asked for; the message names the flag."""


# ----------------------------------------------------------------------------------------------- identity


def model_identity(path, flag):
    """Path, config, and a cheap weights fingerprint (name, size, first and last MiB of every weight file)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    except (OSError, ValueError) as e:  # no such dir / no config.json / an unknown model type
        raise ScoringError(f"{flag}: cannot read a model config from {path!r}: {e}")
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin")))
    for name in files:
        size = os.path.getsize(name)
        digest.update(f"{os.path.basename(name)}:{size}".encode())
        with open(name, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return {"name_or_path": path, "config": config.to_dict(), "weights_fingerprint": digest.hexdigest()[:16]}


def load_tokenizer(args, path, flag):
    try:
        return get_tokenizer(path, None, "right", None, use_fast=not args.data.disable_fast_tokenizer)
    except Exception as e:  # noqa: BLE001  (re-raised with the flag that named the path)
        raise ScoringError(f"{flag}: cannot load a tokenizer from {path!r}: {e}")


def token_rm_settings(identity):
    """``token_rm.checkpoint_settings`` of the checkpoint behind ``identity`` (``model_identity``), as a ScoringError
    naming the flag: the manifest and the run id need the settings before any model is loaded, so a path that is not
    a token RM fails here, before anything is written (``load_token_rm`` checks again when it loads the weights)."""
    try:
        return checkpoint_settings(identity["config"], identity["name_or_path"])
    except ValueError as e:
        raise ScoringError(f"--token_rm.model_name_or_path {e}") from None


def check_compatible(oracle_id, ref_id, oracle_tok, ref_tok):
    """Oracle and reference must share a tokenizer and a vocabulary: scores compare their log-probs id by id."""
    a, b = tokenizer_fingerprint(oracle_tok), tokenizer_fingerprint(ref_tok)
    if a != b:
        raise ScoringError(
            f"oracle and reference tokenizers differ (fingerprints {a} vs {b}; vocab sizes {len(oracle_tok)} vs "
            f"{len(ref_tok)}): token scores need one shared tokenizer"
        )
    va, vb = oracle_id["config"].get("vocab_size"), ref_id["config"].get("vocab_size")
    if va != vb:
        raise ScoringError(f"oracle and reference vocabularies differ (config vocab_size {va} vs {vb})")


def cross_tokenizer_identity(oracle_path, oracle_tok, policy_tok):
    """The manifest / run-id entries of --policy.tokenizer; ScoringError when a tokenizer has no character offsets."""
    for flag, tok in (("--policy.tokenizer", policy_tok), ("--oracle.model_name_or_path", oracle_tok)):
        if not getattr(tok, "is_fast", False):
            raise ScoringError(f"--policy.tokenizer maps tokens by character offsets (return_offsets_mapping), which "
                               f"needs fast tokenizers: the tokenizer of {flag} {tok.name_or_path!r} is a "
                               f"{type(tok).__name__}, not a fast tokenizer")
    return {"oracle_tokenizer": {"name_or_path": oracle_path, "fingerprint": tokenizer_fingerprint(oracle_tok)},
            "token_mapping": TOKEN_MAPPING}


class Scorer(NamedTuple):
    """Who scores, as checked before any weights load: the tokenizer whose ids are written (and its path), the
    oracle's when it differs (``--policy.tokenizer``), the scorer's entries of the manifest and run id, its formula."""

    tokenizer: object
    tokenizer_path: str
    oracle_tokenizer: object
    identity: dict
    formula: str


def scorer_identity(args) -> Scorer:
    """The scorer's models and tokenizers, checked. The oracle_ref identity is exactly the one before --scorer
    existed (its dirs still resume); token_rm's has other keys, so a dir scored by one scorer is "another run" for
    the other."""
    if args.scorer == "oracle_ref":
        oracle_id = model_identity(args.oracle.model_name_or_path, "--oracle.model_name_or_path")
        ref_id = model_identity(args.ref.model_name_or_path, "--ref.model_name_or_path")
        tokenizer_path = args.oracle.model_name_or_path
        tokenizer = load_tokenizer(args, tokenizer_path, "--oracle.model_name_or_path")
        check_compatible(oracle_id, ref_id, tokenizer, load_tokenizer(args, args.ref.model_name_or_path, "--ref.model_name_or_path"))
        identity, formula = {"oracle": oracle_id, "ref": ref_id}, FORMULAS["oracle_ref"]
    else:
        tokenizer_path = args.token_rm.model_name_or_path
        rm_id = model_identity(tokenizer_path, "--token_rm.model_name_or_path")
        settings = token_rm_settings(rm_id)
        tokenizer = load_tokenizer(args, tokenizer_path, "--token_rm.model_name_or_path")
        identity = {"scorer": "token_rm", "token_rm": {**rm_id, "settings": settings}}
        formula = FORMULAS[settings["activation"]]
    oracle_tokenizer = None
    if args.policy.tokenizer is not None:  # the oracle's tokenizer scores; the policy's makes the ids (and the run id)
        oracle_tokenizer, tokenizer_path = tokenizer, args.policy.tokenizer
        tokenizer = load_tokenizer(args, tokenizer_path, "--policy.tokenizer")
        identity.update(cross_tokenizer_identity(args.oracle.model_name_or_path, oracle_tokenizer, tokenizer))
    return Scorer(tokenizer, tokenizer_path, oracle_tokenizer, identity, formula)


def row_tokenizer_for(args, scorer, strategy, rank):
    """The row tokenizer of the ids written: RowTokenizer, or with --policy.tokenizer a CrossRowTokenizer."""
    row_tokenizer = RowTokenizer(scorer.tokenizer, strategy)
    if scorer.oracle_tokenizer is None:
        return row_tokenizer
    # The oracle keeps its own chat template: --data.tokenizer_chat_template is the policy's.
    oracle_data = argparse.Namespace(**{**vars(args.data), "tokenizer_chat_template": None})
    return CrossRowTokenizer(row_tokenizer, RowTokenizer(scorer.oracle_tokenizer, DataStrategy(oracle_data, rank, quiet=True)))


def run_manifest(args, scorer, fingerprint, rows):
    """The run's (not yet complete) manifest; its ``run_id`` hashes everything that decides the scores written."""
    data_flags = {k: v for k, v in vars(args.data).items()}
    if data_flags.get("prompt_split") == "none":  # without a split, the run id stays that of earlier versions
        data_flags.pop("prompt_split")
        data_flags.pop("assistant_marker", None)
    data_flags["rows"] = rows
    score_flags = {"param_dtype": args.ds.param_dtype, "attn_implementation": args.ds.attn_implementation,
                   "shard_size": args.score.shard_size}
    identity = {**scorer.identity, "tokenizer": fingerprint, "data": data_flags, "score": score_flags}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return scores_dir.new_manifest({
        "complete": False, "run_id": run_id, "scorer": args.scorer, "formula": scorer.formula, **scorer.identity,
        "tokenizer": {"name_or_path": scorer.tokenizer_path, "fingerprint": fingerprint},
        "data": data_flags,
        "score": {**score_flags, "micro_batch_size": args.score.micro_batch_size, "max_tokens": args.score.max_tokens,
                  "k_perc": args.k_perc, "tokenize_ahead": args.score.tokenize_ahead},
        "shards": {"total": math.ceil(rows / args.score.shard_size)},
    })


# ----------------------------------------------------------------------------------------------- statistics


def new_stats(k_perc):
    side = lambda: {"tokens": 0, "sum": 0.0, "sumsq": 0.0, "min": math.inf, "max": -math.inf}  # noqa: E731
    sel = lambda: {"selected": 0, "selected_sum": 0.0}  # noqa: E731
    return {
        "pairs_read": 0, "pairs_kept": 0, "skipped": {r: 0 for r in SKIP_REASONS}, "skipped_examples": [],
        "chosen": side(), "rejected": side(), "pairs_chosen_sum_higher": 0,
        "selection": {str(k): {"chosen": sel(), "rejected": sel()} for k in k_perc},
        "tokens": 0, "compute_s": 0.0, "tokenize_s": 0.0, "tokenize_wait_s": 0.0,
    }


def add_scores(stats, k_perc, chosen, rejected):
    """Accumulate one batch's per-pair score tensors (lists of 1-D fp32 tensors) into stats."""
    for name, rows in (("chosen", chosen), ("rejected", rejected)):
        s, flat = stats[name], torch.cat(rows).double()
        s["tokens"] += flat.numel()
        s["sum"] += flat.sum().item()
        s["sumsq"] += (flat * flat).sum().item()
        s["min"], s["max"] = min(s["min"], flat.min().item()), max(s["max"], flat.max().item())
        lengths = torch.tensor([len(r) for r in rows])
        padded = zero_pad_sequences(rows, "right", stack=True)
        valid = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        ranks = key_token_ranks(padded, name == "chosen", valid)  # select_key_tokens' order, once for every k
        for k in k_perc:
            mask = ranks < num_selected(lengths, k).unsqueeze(1)
            sel = stats["selection"][str(k)][name]
            sel["selected"] += int(mask.sum())
            sel["selected_sum"] += padded[mask].double().sum().item()
    stats["pairs_chosen_sum_higher"] += sum(int(c.sum() > r.sum()) for c, r in zip(chosen, rejected))


def merge_stats(records, k_perc):
    """The shard records summed; ``skipped_examples`` by row index, SKIP_EXAMPLES_KEPT per reason."""
    total, skips = new_stats(k_perc), SkipCounter(SKIP_REASONS, kept=SKIP_EXAMPLES_KEPT)
    for rec in records:
        for key in ("pairs_read", "pairs_kept", "pairs_chosen_sum_higher", "tokens", "compute_s"):
            total[key] += rec[key]
        for key in ("tokenize_s", "tokenize_wait_s"):  # absent from records written before shards were prefetched
            total[key] += rec.get(key, 0.0)
        skips.add_records(rec["skipped"], rec["skipped_examples"])
        for name in ("chosen", "rejected"):
            a, b = total[name], rec[name]
            a["tokens"] += b["tokens"]
            a["sum"] += b["sum"]
            a["sumsq"] += b["sumsq"]
            a["min"], a["max"] = min(a["min"], b["min"]), max(a["max"], b["max"])
            for k in k_perc:
                for field in ("selected", "selected_sum"):
                    total["selection"][str(k)][name][field] += rec["selection"][str(k)][name][field]
    return total, skips


def summarize(total, skips, k_perc):
    """Manifest sections 'counts', 'score_stats', 'selection' from merged shard records."""

    def side(s):
        n = max(s["tokens"], 1)
        mean = s["sum"] / n
        return {"tokens": s["tokens"], "mean": mean, "std": math.sqrt(max(s["sumsq"] / n - mean * mean, 0.0)),
                "min": s["min"] if s["tokens"] else None, "max": s["max"] if s["tokens"] else None}

    kept = total["pairs_kept"]
    counts = {
        "pairs_read": total["pairs_read"], "pairs_kept": kept, "pairs_skipped": skips.total,
        "skipped_by_reason": skips.counts,
        "skipped_examples": {reason: [{"index": index, "reason": reason, "message": message} for index, message in bucket]
                             for reason, bucket in skips.examples.items()},
    }
    score_stats = {
        "chosen": side(total["chosen"]), "rejected": side(total["rejected"]),
        # The scorer's own pairwise accuracy: how often sum_t r(chosen) > sum_t r(rejected).
        "pair_accuracy": total["pairs_chosen_sum_higher"] / kept if kept else None,
    }
    selection = {}
    for k in k_perc:
        entry = {}
        for name in ("chosen", "rejected"):
            s = total["selection"][str(k)][name]
            entry[name] = {
                "tokens_selected": s["selected"],
                "fraction_selected": s["selected"] / max(total[name]["tokens"], 1),
                "mean_selected_score": s["selected_sum"] / s["selected"] if s["selected"] else None,
            }
        selection[str(k)] = entry
    return counts, score_stats, selection


# ----------------------------------------------------------------------------------------------- scoring


def make_batches(items, micro_batch_size, max_tokens):
    """Length-sorted (longest first, so an out-of-memory shows at once) padded batches of pairs."""
    items = sorted(items, key=lambda it: -max(len(it[2]), len(it[3])))
    batches, batch = [], []
    for it in items:
        width = max(len(it[2]), len(it[3]))  # the batch's padded length: its first (longest) item's
        if batch and (len(batch) == micro_batch_size or (max_tokens and 2 * (len(batch) + 1) * batch_width > max_tokens)):
            batches.append(batch)
            batch = []
        if not batch:
            batch_width = width
        batch.append(it)
    if batch:
        batches.append(batch)
    return batches


def pad_batch(batch, pad_id):
    """A batch of pairs -> (ids, mask): its chosen then its rejected sequences, right-padded, on the host."""
    seqs = [torch.tensor(it[2]) for it in batch] + [torch.tensor(it[3]) for it in batch]
    ids = zero_pad_sequences(seqs, "right", pad_id, stack=True)
    mask = zero_pad_sequences([torch.ones_like(s) for s in seqs], "right", stack=True)
    return ids, mask


def score_batch(scorer, batch, ids, mask, device):
    """-> (chosen scores, rejected scores): lists of 1-D fp32 CPU tensors, one per pair, in batch order."""
    prompt_lens = [it[1] for it in batch] * 2
    lengths = [len(it[2]) for it in batch] + [len(it[3]) for it in batch]
    scores = scorer(ids.to(device), mask.to(device), prompt_lens, lengths)
    return scores[: len(batch)], scores[len(batch) :]


def map_to_policy(batch, chosen, rejected):
    """CrossRowTokenizer items and their oracle-token scores -> (policy items (index, prompt_len, chosen_ids,
    rejected_ids), policy-token chosen scores, rejected scores)."""
    items, mapped_c, mapped_r = [], [], []
    for (index, _, _, _, policy, (map_c, map_r)), c, r in zip(batch, chosen, rejected):
        items.append((index, *policy))
        mapped_c.append(map_c.apply(c))
        mapped_r.append(map_r.apply(r))
    return items, mapped_c, mapped_r


class PreparedShard(NamedTuple):
    """A shard as the forward takes it: tokenized, cut into batches, padded on the host (``prepare_shard``)."""

    shard: int
    rows: range
    batches: list  # (items, ids, mask) per batch; items (index, *encoded), in make_batches' order
    stats: dict  # new_stats with pairs_read, skipped, skipped_examples and tokenize_s filled in
    n_skipped: int


def _encode_rows(rows, first_index, row_tokenizer):
    """The row tokenizer's results for a shard's rows, one batch; an unexpected failure names its row."""
    try:
        return row_tokenizer.encode_many(rows)
    except Exception:
        for offset, row in enumerate(rows):  # find the row that fails, and name it
            try:
                row_tokenizer.encode(row)
            except Exception as e:  # noqa: BLE001  (an unexpected row shape: name the row, keep the cause)
                raise RuntimeError(f"row {first_index + offset}: cannot tokenize it as train_dpo would: {e!r}") from e
        raise


def prepare_shard(data, shard, row_tokenizer, args) -> PreparedShard:
    """Read, tokenize (one batch for the whole shard) and batch shard ``shard``: all that precedes its forward, so
    that it can run ahead of it, on another thread. Skips are counted here, by row index, as they always were."""
    started = time.perf_counter()
    rows = _shard_rows(data, shard, args.score.shard_size)
    columns = data[rows.start : rows.stop]  # one read; the same dicts iterating data.select(rows) gives
    row_dicts = [dict(zip(columns, values)) for values in zip(*columns.values())]
    stats, skips, items = new_stats(args.k_perc), SkipCounter(SKIP_REASONS, kept=None), []
    stats["pairs_read"] = len(row_dicts)
    for index, result in zip(rows, _encode_rows(row_dicts, rows.start, row_tokenizer)):
        if isinstance(result, Skip):
            skips.add(index, result)
        else:
            items.append((index, *result))
    stats["skipped"], stats["skipped_examples"] = skips.counts, skips.to_records()
    pad_id = row_tokenizer.tokenizer.pad_token_id
    batches = [(batch, *pad_batch(batch, pad_id))
               for batch in make_batches(items, args.score.micro_batch_size, args.score.max_tokens)]
    stats["tokenize_s"] = time.perf_counter() - started
    return PreparedShard(shard, rows, batches, stats, len(row_dicts) - len(items))


def prefetched(prepare, shards, ahead, pool):
    """``(prepare(shard), seconds the caller waited for it)`` for each of ``shards``, in order.

    With ``ahead`` > 0 (``--score.tokenize_ahead``), ``pool``'s one thread prepares up to ``ahead`` shards ahead of
    the caller, the first ones from this call on (while the models load); with 0 each is prepared on the caller's
    thread when asked for. Preparing is tokenizer and Python work; the forward it overlaps releases the GIL in its
    kernels (and on a GPU waits on the device), so the two run side by side."""
    futures = collections.deque(pool.submit(prepare, s) for s in shards[:ahead])

    def iterate():
        for i, shard in enumerate(shards):
            started = time.perf_counter()
            prepared = futures.popleft().result() if ahead else prepare(shard)
            if ahead and i + ahead < len(shards):
                futures.append(pool.submit(prepare, shards[i + ahead]))
            yield prepared, time.perf_counter() - started

    return iterate()


def score_shard(prepared, cross, scorer, args, device, progress):
    """Score one prepared shard -> (parquet records in index order, shard record). ``cross``: the items are
    CrossRowTokenizer's (--policy.tokenizer), scored on the oracle's tokens and written on the policy's."""
    stats, started = prepared.stats, time.perf_counter()
    if progress is not None:
        progress.update(prepared.n_skipped)
    records = []
    for batch, ids, mask in prepared.batches:
        chosen, rejected = score_batch(scorer, batch, ids, mask, device)
        if cross:
            batch, chosen, rejected = map_to_policy(batch, chosen, rejected)
        if not bool(torch.isfinite(torch.cat(chosen + rejected)).all()):
            index = next(it[0] for it, c, r in zip(batch, chosen, rejected) if not torch.isfinite(torch.cat([c, r])).all())
            raise RuntimeError(f"row {index}: non-finite token scores (try --ds.param_dtype fp32)")
        add_scores(stats, args.k_perc, chosen, rejected)
        for (index, prompt_len, chosen_ids, rejected_ids), c, r in zip(batch, chosen, rejected):
            records.append({"index": index, "prompt_len": prompt_len, "chosen_input_ids": chosen_ids,
                            "rejected_input_ids": rejected_ids, "chosen_scores": c.tolist(), "rejected_scores": r.tolist()})
        tokens = sum(len(c) + len(r) for c, r in zip(chosen, rejected))
        stats["tokens"] += tokens
        if progress is not None:
            progress.tokens += tokens
            progress.update(len(batch))
            progress.set_postfix(tok_per_s=f"{progress.tokens / max(time.perf_counter() - progress.t0, 1e-9):.0f}",
                                 refresh=False)  # shown at the bar's next refresh (update's own rate)
    stats["pairs_kept"] = len(records)
    stats["compute_s"] = time.perf_counter() - started
    records.sort(key=lambda rec: rec["index"])
    return records, stats


def load_model(path, args, device):
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.ds.param_dtype]
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=dtype, attn_implementation=args.ds.attn_implementation
    )
    return model.to(device).eval()


def make_scorer(args, device):
    """The one place the scorer is chosen and its models loaded: -> score(ids, mask, prompt_lens, lengths).

    ``score`` takes a right-padded batch on ``device`` and returns one 1-D fp32 CPU tensor per row: the scores of
    its response tokens, positions prompt_lens[i] .. lengths[i] - 1 (the first response token and EOS included).
    """
    if args.scorer == "oracle_ref":
        oracle = load_model(args.oracle.model_name_or_path, args, device)
        ref = load_model(args.ref.model_name_or_path, args, device)
        return functools.partial(token_scores, oracle, ref)
    try:
        model, settings = load_token_rm(args.token_rm.model_name_or_path, args.ds.param_dtype,
                                        args.ds.attn_implementation)
    except ValueError as e:
        raise ScoringError(f"--token_rm.model_name_or_path: {e}") from None
    model = model.to(device).eval()

    @torch.inference_mode()
    def score(ids, mask, prompt_lens, lengths):
        # r at absolute position t is token t's reward (read from the hidden state that has seen it): no shift.
        rewards = token_rewards(model, ids, mask, kind=settings["activation"]).cpu()
        return [rewards[i, p:n] for i, (p, n) in enumerate(zip(prompt_lens, lengths))]

    return score


# ----------------------------------------------------------------------------------------------- the run


def _dist_setup():
    """Rank, world size and device from the launcher's environment (torchrun / deepspeed), or 1 process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def _sum_across_ranks(values, world, device):
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _shard_rows(data, shard, shard_size) -> range:
    """The rows of a shard: fixed cuts of shard_size rows, the last one shorter."""
    return range(shard * shard_size, min((shard + 1) * shard_size, len(data)))


def _score_my_shards(args, data, row_tokenizer, rank, world, device):
    """Score this rank's shards not done yet (shard s is rank s % world's) -> ([shards, pairs kept, tokens] scored
    here, the time scoring started: after the models loaded). The shards are tokenized ahead of the forward
    (``prefetched``), the first while the models load."""
    out, n_shards = args.output_dir, math.ceil(len(data) / args.score.shard_size)
    mine = [s for s in range(n_shards) if s % world == rank]
    todo = scores_dir.pending_shards(out, mine)
    if len(todo) < len(mine):
        print(f"[rank {rank}] resuming: {len(mine) - len(todo)} of my {len(mine)} shards already done", flush=True)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-tokenize")
    try:
        prepare = functools.partial(prepare_shard, data, row_tokenizer=row_tokenizer, args=args)
        shards = prefetched(prepare, todo, args.score.tokenize_ahead, pool)
        scorer = make_scorer(args, device)
        return _score_prepared(args, shards, isinstance(row_tokenizer, CrossRowTokenizer), scorer, device, rank,
                               _progress(args, data, mine, todo, rank, world))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(args, data, mine, todo, rank, world):
    """Rank 0's progress bar (pairs, and tokens per second), or None."""
    from tqdm import tqdm

    if rank != 0:
        return None
    pairs = {s: len(_shard_rows(data, s, args.score.shard_size)) for s in mine}
    progress = tqdm(total=sum(pairs.values()), initial=sum(pairs[s] for s in mine if s not in todo), unit="pair",
                    desc=f"scoring (rank 0 of {world})", dynamic_ncols=True, file=sys.stderr)
    progress.tokens, progress.t0 = 0, time.perf_counter()
    return progress


def _score_prepared(args, shards, cross, scorer, device, rank, progress):
    """Score and write each prepared shard as it comes -> (done here, the time scoring started)."""
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, 0))
    score_start = time.time()
    done_here = [0, 0, 0]  # shards, pairs kept, tokens scored by this process
    for n, (prepared, wait_s) in enumerate(shards, 1):
        records, stats = score_shard(prepared, cross, scorer, args, device, progress)
        stats.update(tokenize_wait_s=wait_s, compute_s=stats["compute_s"] + wait_s)
        scores_dir.write_shard(args.output_dir, prepared.shard, records,
                               {"shard": prepared.shard, "first_index": prepared.rows.start, "rank": rank, **stats})
        done_here = [done_here[0] + 1, done_here[1] + stats["pairs_kept"], done_here[2] + stats["tokens"]]
        if kill_after and n >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    if progress is not None:
        progress.close()
    return done_here, score_start


def _finish(args, manifest, done_here, started, device, world):
    """Rank 0, every shard done: the complete manifest (counts, statistics, timing), written; a summary printed."""
    wall_start, score_start = started
    n_shards = manifest["shards"]["total"]
    total, skips = merge_stats(scores_dir.read_shard_records(args.output_dir, n_shards), args.k_perc)
    counts, score_stats, selection = summarize(total, skips, args.k_perc)
    now = time.time()
    manifest.update(
        complete=True, counts=counts, score_stats=score_stats, selection=selection,
        shards={"total": n_shards, "scored_this_run": int(done_here[0]), "resumed": n_shards - int(done_here[0])},
        timing={
            "elapsed_s": now - wall_start, "scoring_elapsed_s": now - score_start,
            "pairs_scored_this_run": int(done_here[1]), "tokens_scored_this_run": int(done_here[2]),
            "tokens_per_s": done_here[2] / max(now - score_start, 1e-9), "world_size": world, "device": str(device),
            "compute_s_all_shards": total["compute_s"], "tokenize_s_all_shards": total["tokenize_s"],
            "tokenize_wait_s_all_shards": total["tokenize_wait_s"],
        },
    )
    scores_dir.write_manifest(args.output_dir, manifest)
    for line in skips.report("skipped {n} pair(s): {reason} (e.g. row {index}: {message})"):
        print(line, flush=True)
    print(f"scored {counts['pairs_kept']} of {counts['pairs_read']} pairs -> {args.output_dir} "
          f"({manifest['timing']['tokens_per_s']:.0f} tokens/s this run)", flush=True)
    if counts["pairs_kept"] == 0:
        raise ScoringError(f"no pair was kept: skipped by reason {counts['skipped_by_reason']}")
    return manifest


def _score(args):
    wall_start = time.time()
    rank, world, device = _dist_setup()
    strategy = DataStrategy(args.data, rank)  # scoring is plain data-parallel inference: no DeepSpeed engine
    scorer = scorer_identity(args)  # every flag and model checked before a model is loaded
    fingerprint = tokenizer_fingerprint(scorer.tokenizer)  # before RewardDataset applies --data.tokenizer_chat_template
    data = blending_datasets(args.data.dataset, args.data.dataset_probs, strategy, args.data.seed,
                             max_count=args.data.max_samples, dataset_split=args.data.dataset_split)
    data = data.select(range(min(args.data.max_samples, len(data))))  # as train_dpo does
    row_tokenizer = row_tokenizer_for(args, scorer, strategy, rank)
    manifest = run_manifest(args, scorer, fingerprint, len(data))
    try:
        scores_dir.prepare_output_dir(args.output_dir, manifest["run_id"], args.overwrite, rank)
    except scores_dir.ScoreDataError as e:
        raise ScoringError(str(e)) from None
    if rank == 0:
        scores_dir.start_run(args.output_dir, manifest)
    _barrier(world)
    done_here, score_start = _score_my_shards(args, data, row_tokenizer, rank, world, device)
    done_here = _sum_across_ranks(done_here, world, device)
    _barrier(world)
    if rank != 0:
        return None
    return _finish(args, manifest, done_here, (wall_start, score_start), device, world)


def score_dataset(args):
    """Score the data set of ``args`` (``cli.score_tokens.parse_args``) into ``args.output_dir``, resuming the same
    run's shards; -> the complete manifest (rank 0) or None (other ranks). A process group this call creates (under
    torchrun / deepspeed) is torn down at the end; a caller's (e.g. a batch of jobs under one launcher,
    ``python -m openrlhf_sepo.cpu --jobs``) must outlive it, with DeepSpeed's groups built on it, and is kept."""
    owned = not torch.distributed.is_initialized()
    try:
        return _score(args)
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
