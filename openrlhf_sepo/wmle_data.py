"""Reward-weighted MLE's data: one side of ``score_tokens`` scores dirs as OpenRLHF SFT items, each response's
token weights (``wmle.token_weights``) in the loss-mask slot. The dirs are read and checked by ``scores_dir.load``."""

import numpy as np
import torch
from torch.utils.data import Dataset

from openrlhf_sepo.scores_dir import ScoreDataError, load
from openrlhf_sepo.wmle import SIDES, WEIGHTS, token_weights


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

    def __init__(self, dataset: str, tokenizer, max_length: int, strategy=None, side: str = "chosen",
                 weight: str = "reward", reward_to_go: bool = False, max_samples: int = 100000000) -> None:
        super().__init__()
        if side not in SIDES:
            raise ScoreDataError(f"--wmle.side must be one of {SIDES}, got {side!r}")
        if weight not in WEIGHTS:
            raise ScoreDataError(f"--wmle.weight must be one of {WEIGHTS}, got {weight!r}")
        self.tokenizer, self.max_length, self.strategy = tokenizer, max_length, strategy
        self.side, self.weight, self.reward_to_go = side, weight, reward_to_go
        log = strategy.print if strategy is not None else print

        scores = load(dataset, tokenizer, max_length, (side,), max_samples, keep=("prompt_len", f"{side}_input_ids"),
                      log=log, describe=f"WeightedSFTDataset: {{n}} {side} responses from {{score_dir}}")
        weights = []
        for part in scores.parts:  # per dir, so that an error names the dir and its row
            values, n_scores = part.scores[side]
            try:
                weights.append(token_weights(values, weight, reward_to_go, n_scores).numpy().astype(np.float32))
            except ScoreDataError as e:
                raise ScoreDataError(f"{part.score_dir!r}, {side} side: {e}") from None
        self.data, self.prompt_lens = scores.data, scores.prompt_lens
        total, lengths = len(self.data), scores.scores[side][1]
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
