"""Token scoring throughput: score_tokens vs the published per-example loop vs the bare forward passes.

One tiny oracle/reference pair (vocabulary >= 8k, so the log-softmax costs what it costs in real models), one
preference data set, one process; response tokens scored per second for:

- ``score_tokens``: the real CLI (``openrlhf_sepo.cli.score_tokens.main``), tokenization, batching, fp32
  log-probs, selection statistics and parquet writing included (model loading excluded); the shard is tokenized in
  one batch by a background thread that starts before the models load (``--score.tokenize_ahead 1``, the default),
  so only the time the forward waited for it counts; printed beside it: the same with ``--score.tokenize_ahead 0``
  (each shard tokenized on the main thread, just before its forward), and how long tokenizing took;
- ``per-example loop``: the published script's style on the same pre-tokenized pairs (tokenization not timed,
  which favours the loop): batch 1, full-vocabulary log-softmax copied to the host, argmax-loop selection for
  k = 0.1, 0.3, 0.5;
- ``bare forward`` (the floor): only ``oracle(ids)`` and ``ref(ids)`` over the same length-sorted padded batches
  score_tokens builds, full logits, nothing else; and the same computing only the logits of response positions
  (``logits_to_keep``, as score_tokens does): the floor that matters; and that floor with the log-softmax of
  its kept logits at their next tokens, the normalizer no exact scorer can skip (printed as its share).

Prints ``speedup vs loop`` (goal >= 2 on 2 CPU cores), ``time vs bare forward`` (goal <= 1.3) and ``time vs bare
forward with response logits only`` (goal <= 1.05). Runs unchanged on a GPU (models on cuda:0, timings
synchronised). Each method runs ``--repeats`` times, interleaved; the best time counts, and the goal of 1.05 is
read on the median of the per-repeat ratios of score_tokens to the response-logits floor, each taken side by side.

    python benchmarks/bench_scoring.py [--pairs 96] [--vocab 8192] [--hidden 256] [--layers 4] [--repeats 5]

What score_tokens does beyond the response-logits floor: the log-normalizer (a log-softmax over the vocabulary at
every scored token, in cache-sized chunks on the CPU), the selection statistics, the parquet. What it does less of:
since 2026-12-01 its LM head runs at the scored tokens only, packed (``scoring.scored_logprobs``), while the floor's
``logits_to_keep`` runs it at every row's last ``keep`` positions: at the defaults 3184 positions per model against
2876 scored (the prompt tails of rows with longer prompts, and the padding), on a strided slice of the hidden states.
The floor is left as it was (what HF's ``logits_to_keep`` gives); the two differences roughly cancel at this size.
Tokenization is off that path: before 2026-11-29 each row went through OpenRLHF's RewardDataset code one at a time
on the main thread (about 1 ms per pair on this CPU; on an H100 it made scoring 1.6-2.1x the bare forward).
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
import torch

from openrlhf_sepo import tiny
from openrlhf_sepo.cli import score_tokens
from openrlhf_sepo.datasets import DataStrategy
from openrlhf_sepo.scoring import response_logprobs

K_PERC = (0.1, 0.3, 0.5)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats, device):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def published_loop(oracle, ref, items, device):
    """Batch 1, full log-softmax moved to the host, per-k argmax loops: the published script's structure."""
    for _, prompt_len, chosen_ids, rejected_ids in items:
        for ids, largest in ((chosen_ids, True), (rejected_ids, False)):
            x = torch.tensor([ids], device=device)
            with torch.no_grad():
                logp_o = torch.log_softmax(oracle(x).logits[0].float(), dim=-1).cpu()
                logp_r = torch.log_softmax(ref(x).logits[0].float(), dim=-1).cpu()
            labels = torch.tensor(ids[prompt_len:]).unsqueeze(1)
            scores = (logp_o[prompt_len - 1 : -1].gather(1, labels) - logp_r[prompt_len - 1 : -1].gather(1, labels))[:, 0]
            for k in K_PERC:
                work, picked = scores.clone(), []
                for _ in range(max(1, math.floor(k * len(scores)))):
                    i = int(torch.argmax(work) if largest else torch.argmin(work))
                    picked.append(i)
                    work[i] = -math.inf if largest else math.inf


def bare_forward(oracle, ref, tensors, logits_to_keep=None, normalize=False):
    """The floors: both models' forwards over the batches (``logits_to_keep``: the logits of the response positions
    only); with ``normalize``, those kept logits' log-probabilities of their next tokens (``response_logprobs``), the
    normalizer any exact scorer must pay on top of the logits."""
    with torch.inference_mode():
        for ids, mask, keep in tensors:
            extra = {"logits_to_keep": keep} if logits_to_keep else {}
            for model in (oracle, ref):
                if normalize:  # the same kept logits, normalized: score_tokens' path for models it cannot split
                    response_logprobs(model, ids, mask, ids.shape[1] - keep + 1)
                else:
                    model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop_pairs", type=int, default=24, help="time the (slow) loop on the first N pairs only; 0: all")
    args = p.parse_args(argv)

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = "bf16" if device.type == "cuda" else "fp32"
    work = tempfile.mkdtemp(prefix="bench_scoring_")
    tok_dir = os.path.join(work, "tokenizer")
    tiny.build_tokenizer(tok_dir)
    for name, seed in (("oracle", 1), ("ref", 0)):
        tiny.build_model(os.path.join(work, name), tok_dir, args.hidden, args.layers, vocab_size=args.vocab, seed=seed)
    data = tiny.write_preference_data(os.path.join(work, "pairs.jsonl"), args.pairs, seed=7)
    cli_flags = ["--oracle.model_name_or_path", os.path.join(work, "oracle"),
                 "--ref.model_name_or_path", os.path.join(work, "ref"), "--data.dataset", data,
                 "--data.apply_chat_template", "--data.max_len", "512", "--ds.param_dtype", dtype,
                 "--score.micro_batch_size", str(args.micro_batch_size), "--output_dir", os.path.join(work, "scores"),
                 "--overwrite"]

    # Same pairs, same batches, for the loop and the floor (built outside the timed region).
    cli_args = score_tokens.parse_args(cli_flags)
    strategy = DataStrategy(cli_args.data)
    tokenizer = score_tokens.load_tokenizer(cli_args, cli_args.oracle.model_name_or_path, "oracle")
    row_tok = score_tokens.RowTokenizer(tokenizer, strategy)
    rows = [json.loads(line) for line in open(data)]
    items = [(i, *res) for i, res in enumerate(row_tok.encode_many(rows)) if not isinstance(res[0], str)]
    oracle = score_tokens.load_model(cli_args.oracle.model_name_or_path, cli_args, device)
    ref = score_tokens.load_model(cli_args.ref.model_name_or_path, cli_args, device)
    tensors = []
    for batch in score_tokens.make_batches(items, args.micro_batch_size, 0):
        seqs = [it[2] for it in batch] + [it[3] for it in batch]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        tensors.append((ids.to(device), mask.to(device), width - min(it[1] for it in batch) + 1))
    tokens = sum(len(it[2]) + len(it[3]) - 2 * it[1] for it in items)

    # score_tokens (the real CLI: tokenize, batch, score, stats, parquet; model loading excluded) and the floors,
    # interleaved so that a load change on a shared machine hits them alike. Per method the best of repeats; per
    # repeat the side-by-side ratio to the response-logits floor, whose median is the robust figure (this 2-core
    # VM's speed drifts by 5-10% between runs, which moves a best-of-3 ratio by as much).
    ours = inline = floor = floor_trimmed = floor_normalized = math.inf
    ratios, ratios_normalized = [], []
    for _ in range(args.repeats):
        timing = score_tokens.main(cli_flags)["timing"]
        assert timing["tokens_scored_this_run"] == tokens  # the same tokens as the loop and the floor
        if timing["scoring_elapsed_s"] < ours:
            ours, tokenize_s, wait_s = (timing[k] for k in ("scoring_elapsed_s", "tokenize_s_all_shards",
                                                            "tokenize_wait_s_all_shards"))
        inline = min(inline, score_tokens.main(cli_flags + ["--score.tokenize_ahead", "0"])["timing"]["scoring_elapsed_s"])
        floor = min(floor, best_time(lambda: bare_forward(oracle, ref, tensors), 1, device))
        trimmed = best_time(lambda: bare_forward(oracle, ref, tensors, True), 1, device)
        floor_trimmed = min(floor_trimmed, trimmed)
        normalized = best_time(lambda: bare_forward(oracle, ref, tensors, True, True), 1, device)
        floor_normalized = min(floor_normalized, normalized)
        ratios.append(timing["scoring_elapsed_s"] / trimmed)
        ratios_normalized.append(timing["scoring_elapsed_s"] / normalized)
    loop_items = items[: args.loop_pairs] if args.loop_pairs else items
    loop_tokens = sum(len(it[2]) + len(it[3]) - 2 * it[1] for it in loop_items)
    loop = best_time(lambda: published_loop(oracle, ref, loop_items, device), 1, device)

    rate = lambda n, t: n / t  # noqa: E731
    print(f"\ndevice {device}, dtype {dtype}, torch threads {torch.get_num_threads()}; {len(items)} pairs, "
          f"{tokens} response tokens, vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, "
          f"micro batch {args.micro_batch_size}")
    print(f"{'method':44s} {'seconds':>9s} {'tokens/s':>10s}")
    print(f"{'score_tokens (CLI scoring phase)':44s} {ours:9.3f} {rate(tokens, ours):10.0f}")
    print(f"{'  of which waiting for the tokenizer':44s} {wait_s:9.3f}   (tokenizing took {tokenize_s:.3f} s, "
          f"in the background)")
    print(f"{'score_tokens, --score.tokenize_ahead 0':44s} {inline:9.3f} {rate(tokens, inline):10.0f}")
    print(f"{'published per-example loop':44s} {loop * tokens / loop_tokens:9.3f} {rate(loop_tokens, loop):10.0f}")
    print(f"{'bare forward, full logits (floor)':44s} {floor:9.3f} {rate(tokens, floor):10.0f}")
    print(f"{'bare forward, response logits only':44s} {floor_trimmed:9.3f} {rate(tokens, floor_trimmed):10.0f}")
    print(f"{'  the same, and their log-softmax':44s} {floor_normalized:9.3f} {rate(tokens, floor_normalized):10.0f}")
    speedup = rate(tokens, ours) / rate(loop_tokens, loop)
    over_floor = ours / floor
    print(f"\nspeedup vs per-example loop: {speedup:.2f}x   (goal >= 2)")
    print(f"time vs bare forward:        {over_floor:.2f}x   (goal <= 1.3)")
    print(f"time vs bare forward with response logits only: {ours / floor_trimmed:.2f}x best against best; median of "
          f"the {len(ratios)} side-by-side ratios {statistics.median(ratios):.2f}x   (goal <= 1.05)")
    print(f"the log-softmax alone: the normalized floor is {floor_normalized / floor_trimmed:.2f}x the "
          f"response-logits floor")
    print(f"time vs the normalized floor: {ours / floor_normalized:.2f}x best against best; median of the side-by-side "
          f"ratios {statistics.median(ratios_normalized):.2f}x")
    return {"tokens": tokens, "score_tokens_s": ours, "tokenize_ahead_0_s": inline, "loop_s": loop * tokens / loop_tokens,
            "floor_s": floor, "floor_response_logits_s": floor_trimmed, "floor_normalized_s": floor_normalized,
            "ratios": ratios, "ratios_normalized": ratios_normalized}


if __name__ == "__main__":
    main()
