"""Reward-weighted MLE (preference-grounded token-level guidance, Yang et al., NeurIPS 2023, arXiv 2306.00398):
train the LM on reference responses y, each token's NLL weighted by its normalised token reward.

    w_t = g_t / sum_{t'} g_{t'}              over the response's tokens
    L   = mean over sequences of  sum_t w_t * (-log pi(y_t | x, y_<t))

``token_weights`` gives w (its docstring has g). The token rewards are those of a ``score_tokens`` scores dir
(``--scorer token_rm``: a learned token RM's rewards in (0, 1.31); ``oracle_ref``: DPO log-ratios of any sign), read
by ``WeightedSFTDataset`` for one side (the chosen or the rejected responses).

How it rides on OpenRLHF's ``SFTTrainer`` without copying its ``fit`` loop. SFT batches are ``(input_ids,
attention_mask, loss_mask)``, the loss mask in shifted layout (entry t = 1 iff token t+1 is trained, as
``SFTDataset.get_loss_mask`` builds it), and the loss is ``SFTLoss`` = ``aggregate_loss(-logp, mask,
token_level_loss=True, batch_num_tokens=...)`` = sum(-logp * mask) / (sum of mask over the optimizer step's
micro-batches and all DP ranks; ``iter_grad_accum_global_norm``). ``WeightedSFTDataset`` puts w_t in the loss-mask
slot, float, summing to 1 per sequence, so that normaliser is the step's number of sequences and OpenRLHF's own
loop computes exactly mean_seq sum_t w_t * NLL_t, with gradient accumulation and data parallelism handled (tested
against a hand computation). What else reads the mask, checked:

- ``_optimizer_step_loss_norm``'s sequence count (rows with mask sum > 0) feeds only the per-sequence mode, unused.
- ``evaluate`` calls ``SFTLoss`` without the step normaliser: ``masked_mean(-logp, w)`` = sum(w * NLL) / sum(w),
  the batch's mean over sequences of the weighted NLL, i.e. the same objective. Kept as it is.
- ``zero_pad_sequences`` keeps the float dtype; padding is 0. ``--ds.packing_samples`` unpads by the attention
  mask and gathers the log-probs back to the padded layout, so the weights still line up.

So ``WeightedMLETrainer`` changes nothing in training; it only adds logs (per step, over all its micro-batches
and ranks): ``wmle_loss`` (the objective, exactly), ``nll`` (plain mean NLL over the weighted tokens, for
reference), ``weight_max`` and ``weight_entropy`` (how peaked the weights are), and the same under ``eval/``.
"""


import numpy as np
import torch
from openrlhf.trainer.sft_trainer import SFTTrainer
from torch.utils.data import Dataset

from openrlhf_sepo.datasets import ScoreDataError, _first_rows, _list_column, open_scores

WEIGHTS = ("reward", "exp")
SIDES = ("chosen", "rejected")
_ROWS_PER_CHUNK = 512  # token_weights pads this many responses at a time (bounded memory)


def token_weights(rewards, kind: str = "reward", reward_to_go: bool = False, lengths=None) -> torch.Tensor:
    """Normalised token weights of one response, or of several concatenated ones.

    ``rewards``: 1-D, the token rewards r_t of one response, or with ``lengths`` (one int per response) the
    concatenation of ``len(lengths)`` responses' rewards. Returns float64 weights of the same shape, each
    response's summing to 1:

        r'_t = sum_{t' >= t} r_{t'}    with reward_to_go, else r_t
        g_t  = r'_t                    kind "reward": needs every r_t >= 0 and sum_t r_t > 0 (so r' >= 0, sum > 0)
        g_t  = exp(r'_t - max r')      kind "exp": any finite r; the max cancels in the normalisation
        w_t  = g_t / sum_{t'} g_{t'}

    A response whose weights cannot be formed (empty, a NaN/inf reward, or with ``reward`` a negative reward or
    a zero sum) is a ``ScoreDataError`` naming it (``row i``: its place among the responses) and, for the sign,
    the way out (``--wmle.weight exp``). Never NaN.
    """
    if kind not in WEIGHTS:
        raise ScoreDataError(f"--wmle.weight must be one of {WEIGHTS}, got {kind!r}")
    flat = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    lengths = torch.tensor([flat.numel()]) if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
    if int(lengths.sum()) != flat.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())}, but there are {flat.numel()} rewards")
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    problems = [(lengths < 1, "has no response token")]
    problems.append((torch.zeros(len(lengths), dtype=torch.bool).index_fill(0, rows[~flat.isfinite()], True),
                     "has a NaN or infinite reward"))
    if kind == "reward":
        negative = torch.zeros(len(lengths), dtype=torch.bool).index_fill(0, rows[flat < 0], True)
        total = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, rows, flat)
        problems += [
            (negative, "has a negative token reward, which --wmle.weight reward cannot weight (it needs r_t >= 0); "
                       "use --wmle.weight exp, which takes rewards of any sign"),
            (~negative & (total <= 0), "has token rewards summing to 0, which --wmle.weight reward cannot normalise; "
                                       "use --wmle.weight exp"),
        ]
    for bad, what in problems:
        if bad.any():
            named = ", ".join(f"row {r}" for r in torch.nonzero(bad).flatten()[:5].tolist())
            raise ScoreDataError(f"{int(bad.sum())} response(s) {what}: {named}{' ...' if bad.sum() > 5 else ''}")

    # Right-pad a chunk of responses to [n, W]: reward-to-go is then a reversed cumsum along the row (exact per
    # row, where a cumsum over the flat data would cancel across rows), and max / sum are row reductions.
    weights = torch.empty_like(flat)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(flat.numel()) - starts[rows]
    for first in range(0, len(lengths), _ROWS_PER_CHUNK):
        last = min(first + _ROWS_PER_CHUNK, len(lengths))
        lo, hi = int(starts[first]), int(starts[last - 1] + lengths[last - 1])
        at = (rows[lo:hi] - first, positions[lo:hi])
        r = torch.zeros(last - first, int(lengths[first:last].max()), dtype=torch.float64)
        r[at] = flat[lo:hi]
        if reward_to_go:
            r = r.flip(-1).cumsum(-1).flip(-1)  # the padding is 0 and on the right: it adds nothing
        valid = torch.zeros_like(r, dtype=torch.bool)
        valid[at] = True
        if kind == "exp":
            r = r.masked_fill(~valid, float("-inf"))
            g = torch.exp(r - r.max(-1, keepdim=True).values)  # the row max gives exp(0) = 1: sum >= 1
        else:
            g = r
        weights[lo:hi] = (g / g.sum(-1, keepdim=True))[at]
    return weights


class WeightedSFTDataset(Dataset):
    """One side of ``score_tokens`` scores dirs as OpenRLHF SFT items, token weights in the loss-mask slot.

    Args:
        dataset: one or more scores dirs, comma-separated (OpenRLHF's ``--data.dataset`` syntax).
        tokenizer, max_length, strategy: as OpenRLHF's ``SFTDataset``. The tokenizer must be the one the scores
            were made with (manifest fingerprint); a row longer than ``max_length`` is an error (never cut).
        side: ``chosen`` or ``rejected``: which responses (and their scores) are the reference responses y.
        weight, reward_to_go: how token rewards become weights (``token_weights``).
        max_samples: at most this many rows per scores dir and in total (as OpenRLHF's ``--data.max_samples``).

    Item: ``(ids [1, T], attention [1, T], weights [1, T] float32)``, the ids as scored (never re-tokenized), the
    weights in ``SFTDataset.get_loss_mask``'s layout: score j belongs to the token at ``prompt_len + j``, so its
    weight is entry ``prompt_len + j - 1``; the prompt entries and the last one are 0, a row's weights sum to 1.
    """

    def __init__(
        self,
        dataset: str,
        tokenizer,
        max_length: int,
        strategy=None,
        side: str = "chosen",
        weight: str = "reward",
        reward_to_go: bool = False,
        max_samples: int = 100000000,
    ) -> None:
        super().__init__()
        import datasets as hf_datasets

        if side not in SIDES:
            raise ScoreDataError(f"--wmle.side must be one of {SIDES}, got {side!r}")
        if weight not in WEIGHTS:
            raise ScoreDataError(f"--wmle.weight must be one of {WEIGHTS}, got {weight!r}")
        self.tokenizer, self.max_length, self.strategy = tokenizer, max_length, strategy
        self.side, self.weight, self.reward_to_go = side, weight, reward_to_go
        ids_column, scores_column = f"{side}_input_ids", f"{side}_scores"
        log = strategy.print if strategy is not None else print

        parts, prompt_lens, weights, lengths = [], [], [], []
        for score_dir in [d.strip() for d in dataset.split(",") if d.strip()]:
            manifest, part = open_scores(score_dir, tokenizer, ("prompt_len", ids_column, scores_column), max_samples)
            table = part.with_format("arrow")[:]
            prompt_len, values, n_scores = self._check_rows(score_dir, manifest, table)
            try:
                weights.append(token_weights(values, weight, reward_to_go, n_scores).numpy().astype(np.float32))
            except ScoreDataError as e:  # the rows are this dir's rows
                raise ScoreDataError(f"{score_dir!r}, {side} side: {e}") from None
            prompt_lens.append(prompt_len)
            lengths.append(n_scores)
            parts.append(part.select_columns(["prompt_len", ids_column]))
            log(f"WeightedSFTDataset: {len(part)} {side} responses from {score_dir}")
        if not parts:
            raise ScoreDataError(f"no scores dir given (dataset={dataset!r})")

        total = min(max_samples, sum(len(p) for p in parts))
        self.data = hf_datasets.concatenate_datasets(parts).select(range(total))
        self.prompt_lens = np.concatenate(prompt_lens)[:total]
        lengths = np.concatenate(lengths)[:total]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.weights = np.concatenate(weights)[: self.offsets[-1]]  # flat, one float32 per response token
        # How peaked the weights are, against uniform weights (max 1/N, entropy log N), at a glance.
        rows = np.repeat(np.arange(total), lengths)
        w = self.weights.astype(np.float64)
        entropy = np.bincount(rows, -w * np.log(np.where(w > 0, w, 1.0)), minlength=total)
        log(f"WeightedSFTDataset: {total} {side} responses, {int(lengths.sum())} weighted tokens, weight={weight}"
            f"{' of the reward-to-go' if reward_to_go else ''}: mean max weight "
            f"{np.maximum.reduceat(w, self.offsets[:-1]).mean():.4g} (uniform {np.mean(1.0 / lengths):.4g}), "
            f"mean entropy {entropy.mean():.4g} (uniform {np.log(lengths).mean():.4g})")

    def _check_rows(self, score_dir, manifest, table):
        """(prompt_len, flat scores, scores per row) of one dir's side, or an error naming the bad rows."""
        indices = table.column("index").to_numpy() if "index" in table.column_names else np.arange(table.num_rows)
        prompt_len = table.column("prompt_len").to_numpy().astype(np.int64)
        _, n_ids = _list_column(table, f"{self.side}_input_ids")
        values, n_scores = _list_column(table, f"{self.side}_scores")
        values = values.astype(np.float64)
        bad_values = np.zeros(table.num_rows, dtype=bool)
        bad_values[np.repeat(np.arange(table.num_rows), n_scores)[~np.isfinite(values)]] = True
        problems = [
            (prompt_len < 1, "has prompt_len < 1: its first response token has no log-prob to train"),
            (n_scores != n_ids - prompt_len, f"has len({self.side}_scores) != len({self.side}_input_ids) - prompt_len"),
            (n_scores < 1, f"has an empty {self.side} response"),
            (bad_values, f"has NaN or infinite {self.side}_scores"),
            (
                n_ids > self.max_length,
                f"has {self.side} ids longer than --data.max_len {self.max_length} (scored with max_len "
                f"{manifest['data']['max_len']}): raise --data.max_len or re-score with a smaller one",
            ),
        ]
        for bad, what in problems:
            if bad.any():
                raise ScoreDataError(f"{score_dir!r}: {int(bad.sum())} row(s) {what}: {_first_rows(bad, indices)}")
        return prompt_len, values, n_scores

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        ids = torch.tensor(self.data[idx][f"{self.side}_input_ids"], dtype=torch.long).unsqueeze(0)
        prompt_len = int(self.prompt_lens[idx])
        weights = torch.zeros(ids.shape, dtype=torch.float32)
        weights[0, prompt_len - 1 : -1] = torch.from_numpy(self.weights[self.offsets[idx] : self.offsets[idx + 1]])
        return ids, torch.ones_like(ids), weights

    def collate_fn(self, item_list):
        """Right-pad as OpenRLHF's ``SFTDataset.collate_fn``: ids with pad_token_id, attention and weights with 0."""
        from openrlhf.utils.utils import zero_pad_sequences

        ids, attention, weights = zip(*item_list)
        return (
            zero_pad_sequences(list(ids), "right", self.tokenizer.pad_token_id),
            zero_pad_sequences(list(attention), "right"),
            zero_pad_sequences(list(weights), "right"),
        )


class WeightedMLETrainer(SFTTrainer):
    """OpenRLHF's ``SFTTrainer`` on ``WeightedSFTDataset`` batches: same arguments, same ``fit``, ``evaluate``,
    checkpoints and loss (see the module docstring for why its loss is the weighted MLE). It adds logs only.

    Per optimizer step, summed over its micro-batches and all ranks (N sequences, w their weights):
        wmle_loss       sum_seq sum_t w_t * NLL_t / N       (the objective; OpenRLHF's gpt_loss is its last micro-batch)
        nll             mean NLL_t over the tokens with w_t > 0  (plain MLE's loss on the same tokens, for reference)
        weight_max      mean_seq max_t w_t                  (1 / N_tokens when uniform, 1 when one token takes all)
        weight_entropy  mean_seq -sum_t w_t log w_t         (log N_tokens when uniform, 0 when one token takes all)
    and the same four over the eval set under ``eval/``, next to OpenRLHF's ``eval gpt_loss``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_loss = self.loss_fn
        self.loss_fn = self._loss
        self._sums = torch.zeros(6, dtype=torch.float64)

    def _loss(self, per_token_logps, weights, **loss_batch_info):
        """OpenRLHF's ``SFTLoss``, unchanged; the sums behind the logs are recorded on the side."""
        with torch.no_grad():
            nll, w = -per_token_logps.detach().double(), weights.double()
            seqs, tokens = w.sum(-1) > 0, w > 0
            entropy = -(w * torch.where(tokens, w, 1.0).log()).sum(-1)  # 0 log 0 = 0
            self._sums += torch.stack([
                (w * nll).sum(), seqs.sum(), (nll * tokens).sum(), tokens.sum(),
                w.max(-1).values[seqs].sum(), entropy[seqs].sum(),
            ]).cpu()
        return self.sft_loss(per_token_logps, weights, **loss_batch_info)

    def _pop_metrics(self):
        """The recorded sums, summed over ranks (a collective: every rank calls it), as metrics; resets them."""
        sums = self.strategy.all_reduce(self._sums.clone(), op="sum").cpu()
        self._sums.zero_()
        loss_sum, seqs, nll_sum, tokens, max_sum, entropy_sum = sums.tolist()
        seqs, tokens = max(seqs, 1.0), max(tokens, 1.0)
        return {"wmle_loss": loss_sum / seqs, "nll": nll_sum / tokens, "weight_max": max_sum / seqs,
                "weight_entropy": entropy_sum / seqs}

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        """OpenRLHF's, with this step's metrics added to its logs."""
        logs_dict = {**(logs_dict or {}), **self._pop_metrics()}
        step_bar.set_postfix(logs_dict)
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

    def evaluate(self, eval_dataloader, steps=0):
        """OpenRLHF's (its ``eval gpt_loss`` is the weighted NLL, mean of batch means), then the metrics over the
        eval set, logged as ``eval/*``. The training sums are set aside meanwhile."""
        train_sums, self._sums = self._sums, torch.zeros_like(self._sums)
        super().evaluate(eval_dataloader, steps)
        metrics = self._pop_metrics()
        self._sums = train_sums
        if self.strategy.is_rank_0():
            if self._wandb is not None:
                self._wandb.log({**{f"eval/{k}": v for k, v in metrics.items()}, "eval/global_step": steps})
            elif self._tensorboard is not None:
                for k, v in metrics.items():
                    self._tensorboard.add_scalar(f"eval/{k}", v, steps)
