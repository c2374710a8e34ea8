"""``score_tokens`` output -> OpenRLHF DPO batches with key-token selection masks (SePO step 4, at load time).

The scores dirs are read, checked and concatenated by ``scores_dir.load`` (the format's one owner: score j of a
side belongs to the token at absolute position ``prompt_len + j``). The ids are exactly those OpenRLHF's
``RewardDataset(is_dpo=True)`` made at scoring time, so training reads them as they are and never re-tokenizes;
``TokenScoreDataset`` adds the key-token selection (and, with ``nll_skip_bad``, the chosen tokens the NLL term
skips). ``DataStrategy``, ``ScoreDataError`` and ``read_manifest`` are
re-exported from their homes (``rows``, ``scores_dir``) for the imports that name them here.
"""

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from openrlhf_sepo.rows import DataStrategy  # noqa: F401  (re-exported: its documented home before rows.py)
from openrlhf_sepo.scores_dir import ScoreDataError, list_column, load, padded_chunks, read_manifest  # noqa: F401
from openrlhf_sepo.scoring import bad_key_tokens, num_selected, select_key_tokens

# Made from the scores at load (TokenScoreDataset), or, "confidence" (ConfPO's rule), by the trainer in each step
# from the policy's own log-probs (scoring.low_confidence_tokens).
SCORE_SELECTIONS = ("per_response", "global", "random")
STEP_SELECTIONS = ("confidence",)
SELECTION_MODES = SCORE_SELECTIONS + STEP_SELECTIONS


class KeyTokens(NamedTuple):
    """The 5th element of a ``TokenScoreDataset`` batch: OpenRLHF's prompt lengths plus the two selection masks.

    ``chosen_mask`` is [B, Lc-1] and ``rejected_mask`` [B, Lr-1] (bool) for chosen / rejected ids of width Lc /
    Lr, in log-prob layout: entry t is True iff the token ids[t+1] is selected. Prompt and padding are False.
    ``chosen_nll_skip`` ([B, Lc-1] bool, same layout; None unless ``nll_skip_bad``): the chosen tokens the NLL term
    leaves out. ``as_key_tokens`` makes one, with no masks, of a plain OpenRLHF ``RewardDataset`` batch's prompt
    lengths (the ``confidence`` selection, made in the step, needs none).
    """

    prompt_id_lens: list
    chosen_mask: torch.Tensor | None
    rejected_mask: torch.Tensor | None
    chosen_nll_skip: torch.Tensor | None = None


def as_key_tokens(extra) -> KeyTokens:
    """A batch's 5th element as a ``KeyTokens``: its fields when it has them (a ``KeyTokens``, or a tuple of the
    same fields such as benchmarks/bench_gpu.py's copy; a missing ``chosen_nll_skip`` is None), or, for OpenRLHF's
    ``RewardDataset(is_dpo=True)`` (its prompt lengths, a list), ``KeyTokens(prompt_lengths, None, None)``."""
    if hasattr(extra, "prompt_id_lens"):
        return KeyTokens(extra.prompt_id_lens, extra.chosen_mask, extra.rejected_mask,
                         getattr(extra, "chosen_nll_skip", None))
    return KeyTokens(list(extra), None, None)


def common_prefix_lengths(chosen_flat, chosen_lens, rejected_flat, rejected_lens, prompt_len):
    """P per row: the number of leading response tokens (ids after ``prompt_len``) equal in chosen and rejected.

    Flat ids with per-row lengths (as ``scores_dir.list_column`` gives them); vectorised, no loop over rows or tokens.
    """
    chosen_lens, rejected_lens = np.asarray(chosen_lens), np.asarray(rejected_lens)
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    shared = np.maximum(np.minimum(chosen_lens, rejected_lens) - prompt_len, 0)  # response tokens both sides have
    rows = np.repeat(np.arange(len(shared)), shared)
    j = np.arange(int(shared.sum())) - np.repeat(np.cumsum(shared) - shared, shared)
    chosen_at = (np.cumsum(chosen_lens) - chosen_lens + prompt_len)[rows] + j
    rejected_at = (np.cumsum(rejected_lens) - rejected_lens + prompt_len)[rows] + j
    differ = chosen_flat[chosen_at] != rejected_flat[rejected_at]
    prefix = shared.astype(np.int64)
    differ_rows, differ_j = rows[differ], j[differ]
    first = np.flatnonzero(np.diff(differ_rows, prepend=-1))  # rows are sorted: each row's first difference
    prefix[differ_rows[first]] = differ_j[first]
    return prefix


class TokenScoreDataset(Dataset):
    """Preference pairs with token scores, selected into key-token masks at load.

    Args:
        dataset: one or more scores dirs, comma-separated (OpenRLHF's ``--data.dataset`` syntax).
        tokenizer, max_length, strategy: as OpenRLHF's ``RewardDataset``. The tokenizer must be the one the
            scores were made with (manifest fingerprint); a row longer than ``max_length`` is an error.
        k_chosen, k_rejected: selection ratios in (0, 1].
        selection: which eligible tokens (below) each response keeps; E is a response's number of eligible tokens.
            ``per_response`` (the paper): each response keeps its n = max(1, floor(k * E)) eligible tokens with
            the highest scores (chosen) or the lowest (rejected), ties to the earlier position.
            ``global``: one score threshold per side from the whole data set: the max(1, floor(k * sum E)) most
            extreme eligible scores over all responses of that side, ties to the earlier row and position, are
            selected, so a response with many high-reward tokens gives more than a weak one; a response that
            would get none keeps its single most extreme eligible token, so no selection is empty.
            ``random`` (control: does the oracle's choice matter?): per response exactly per_response's count
            n = max(1, floor(k * E)), at eligible positions drawn uniformly at random, ignoring the scores; a
            ``torch.Generator`` seeded with ``seed`` draws them, chosen side first, so the masks are a function
            of (ids, k, seed, exclusion) alone and differ between sides and rows.
            ``confidence`` (ConfPO): every response token; the trainer selects among them in each step from the
            policy's own probabilities (``scoring.low_confidence_tokens``), so the scores are read and checked but
            not used, and k is ignored. It cannot be combined with ``exclude_common_prefix`` or ``nll_skip_bad``.
        exclude_common_prefix: the pair's common prefix, its first P response tokens equal in chosen and rejected
            (same context, same token, so the same score and no preference signal), is ineligible on both sides:
            response position j is eligible iff j >= min(P, N - 1) for a response of N tokens (the cap keeps the
            last token eligible, so E >= 1 even when one response is a prefix of the other). False (default, as
            published SePO): every response token is eligible. Off by default because the benchmark
            (docs/benchmark.md) measured no gain from it: none with the NLL term, a loss without it.
        seed: seed of the ``random`` selection (train_sepo passes ``--train.seed``); unused by the other modes.
        nll_skip_bad: also mark, per chosen response, the tokens the NLL term skips (``scoring.bad_key_tokens``
            with ``k_rejected``: among its n = max(1, floor(k_rejected * N)) lowest scores over all N response
            tokens, and below 0), whatever the selection mode and the common prefix.
        max_samples: at most this many rows per scores dir and in total (as OpenRLHF's ``--data.max_samples``).

    Item: ``(chosen_ids [1, Lc], chosen_attention, rejected_ids [1, Lr], rejected_attention, prompt_len,
    chosen_mask [1, Lc-1], rejected_mask [1, Lr-1])``: RewardDataset's DPO item plus the two selection masks in
    log-prob layout; with ``nll_skip_bad``, then the chosen NLL skip mask [1, Lc-1]. Batch (``collate_fn``): OpenRLHF's DPO 5-tuple ``(chosen_ids, chosen_attention, rejected_ids,
    rejected_attention, extra)`` whose ``extra`` is a ``KeyTokens`` (the prompt lengths plus the two padded masks),
    so that OpenRLHF's ``DPOTrainer`` loops unpack it unchanged (see ``trainer.py``).
    """

    def __init__(
        self,
        dataset: str,
        tokenizer,
        max_length: int,
        strategy=None,
        k_chosen: float = 0.3,
        k_rejected: float = 0.3,
        selection: str = "per_response",
        max_samples: int = 100000000,
        exclude_common_prefix: bool = False,
        seed: int = 0,
        nll_skip_bad: bool = False,
    ) -> None:
        super().__init__()
        if selection not in SELECTION_MODES:
            raise ScoreDataError(f"selection must be one of {SELECTION_MODES}, got {selection!r}")
        if selection in STEP_SELECTIONS and (exclude_common_prefix or nll_skip_bad):
            raise ScoreDataError(f"the {selection} selection is made in the step from the policy's probabilities: "
                                 "it takes neither exclude_common_prefix nor nll_skip_bad")
        for name, k in (("k_chosen", k_chosen), ("k_rejected", k_rejected)):
            if not 0.0 < k <= 1.0:
                raise ScoreDataError(f"{name} must be in (0, 1], got {k}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.strategy = strategy
        self.k_chosen, self.k_rejected, self.selection = k_chosen, k_rejected, selection
        self.exclude_common_prefix, self.seed, self.nll_skip_bad = exclude_common_prefix, seed, nll_skip_bad
        log = strategy.print if strategy is not None else print

        scores = load(dataset, tokenizer, max_length, max_samples=max_samples, log=log,
                      describe="TokenScoreDataset: {n} pairs from {score_dir}")
        self.data, self.prompt_lens = scores.data, scores.prompt_lens
        total = len(self.data)
        prefixes = [common_prefix_lengths(*list_column(part.table, "chosen_input_ids"),
                                          *list_column(part.table, "rejected_input_ids"), part.prompt_len)
                    for part in scores.parts]
        self.common_prefix = np.concatenate(prefixes)[:total]  # P per pair, whether excluded or not
        # Flat per-token selection for each side, with row offsets: one byte per scored token.
        self.selected, self.offsets = {}, {}
        generator = torch.Generator().manual_seed(seed)
        excluded_total = 0
        for side, k, largest in (("chosen", k_chosen, True), ("rejected", k_rejected, False)):
            values, lengths = scores.scores[side]
            values = torch.from_numpy(values)
            # first eligible response position per row: min(P, N - 1), or 0 when nothing is excluded
            excluded = np.minimum(self.common_prefix, lengths - 1) if exclude_common_prefix else np.zeros_like(lengths)
            excluded_total += int(excluded.sum())
            self.offsets[side] = np.concatenate([[0], np.cumsum(lengths)])
            if nll_skip_bad and side == "chosen":  # from the scores themselves, before random replaces them
                self.nll_skip = self._bad_tokens(values, torch.from_numpy(lengths), k_rejected)
            if selection in STEP_SELECTIONS:  # every response token: the trainer selects among them in the step
                self.selected[side] = np.ones(len(values), dtype=bool)
                continue
            if selection == "random":  # uniform keys, drawn whatever the scores, then per_response's rule
                values = torch.rand(len(values), generator=generator, dtype=torch.float64)
            self.selected[side] = self._select(
                values, torch.from_numpy(lengths), torch.from_numpy(excluded), k, largest, log
            )
        kept = sum(int(m.sum()) for m in self.selected.values())
        scored = sum(len(m) for m in self.selected.values())
        pairs_with_prefix = int((self.common_prefix > 0).sum())
        if exclude_common_prefix:
            log(f"TokenScoreDataset: excluded {excluded_total} response tokens (both sides) as the common prefix of "
                f"chosen and rejected in {pairs_with_prefix}/{total} pairs")
        else:
            log(f"TokenScoreDataset: {pairs_with_prefix}/{total} pairs have a common response prefix "
                f"({2 * int(self.common_prefix.sum())} tokens, both sides), kept selectable")
        if selection in STEP_SELECTIONS:
            log(f"TokenScoreDataset: {total} pairs, {scored} response tokens; the {selection} selection is made in "
                "each training step from the policy's probabilities (the scores are not used, nor k)")
        else:
            log(f"TokenScoreDataset: {total} pairs, {selection} selection keeps {kept}/{scored} response tokens")
        if nll_skip_bad:
            log(f"TokenScoreDataset: the NLL term skips {int(self.nll_skip.sum())}/{len(self.nll_skip)} chosen "
                f"response tokens (among each response's lowest k_rejected = {k_rejected} share, and below 0)")

    @staticmethod
    def _bad_tokens(values, lengths, k):
        """Flat bool ``scoring.bad_key_tokens`` over all responses of one side (every response token eligible)."""
        skip = torch.zeros(len(values), dtype=torch.bool)
        for chunk in padded_chunks(values, lengths):
            skip[chunk.tokens] = bad_key_tokens(chunk.padded, k, lengths[chunk.rows])[chunk.at]
        return skip.numpy()

    def _select(self, values, lengths, excluded, k, largest, log):
        """Flat bool selection over all responses of one side (see the class docstring for the modes).

        ``values``: flat scores (random keys for ``random``); ``lengths``: N per row; ``excluded``: per row, the
        number of leading response tokens that are ineligible (0 <= excluded < N).
        """
        if self.selection in ("per_response", "random"):
            selected = torch.zeros(len(values), dtype=torch.bool)
            for chunk in padded_chunks(values, lengths):
                eligible = torch.arange(chunk.padded.shape[1]).unsqueeze(0) >= excluded[chunk.rows].unsqueeze(1)
                mask = select_key_tokens(chunk.padded, k, largest, lengths[chunk.rows], eligible)
                selected[chunk.tokens] = mask[chunk.at]
            return selected.numpy()
        rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(len(values)) - starts[rows]
        # global: rank every eligible token of this side by score (stable: ties keep row, position order); the
        # scores are finite (checked), so the ineligible tokens' infinite keys sort after all of them.
        eligible = positions >= excluded[rows]
        key = (-values if largest else values).masked_fill(~eligible, float("inf"))
        order = torch.sort(key, stable=True).indices
        n = num_selected(int(eligible.sum()), k)
        selected = torch.zeros(len(values), dtype=torch.bool)
        selected[order[:n]] = True
        log(f"TokenScoreDataset: global {'chosen' if largest else 'rejected'} threshold {values[order[n - 1]]:.4g}")
        per_row = torch.zeros(len(lengths), dtype=torch.long).index_add_(0, rows, selected.long())
        for row in (per_row == 0).nonzero().flatten().tolist():  # never empty: keep the row's own eligible extreme
            lo = int(starts[row]) + int(excluded[row])
            row_values = values[lo : int(starts[row]) + int(lengths[row])]
            best = torch.argmax(row_values) if largest else torch.argmin(row_values)  # first extreme on ties
            selected[lo + int(best)] = True
        return selected.numpy()

    def __len__(self):
        return len(self.data)

    def _logprob_mask(self, side, idx, prompt_len, width, flat=None):
        """Selection of row idx (or its entries of ``flat``, a per-token mask of this side) in log-prob layout
        [1, width-1]: score j -> token prompt_len + j -> entry prompt_len + j - 1."""
        flat = self.selected[side] if flat is None else flat
        mask = torch.zeros(1, width - 1, dtype=torch.bool)
        mask[0, prompt_len - 1 :] = torch.from_numpy(flat[self.offsets[side][idx] : self.offsets[side][idx + 1]])
        return mask

    def __getitem__(self, idx):
        row = self.data[idx]
        prompt_len = int(self.prompt_lens[idx])
        chosen_ids = torch.tensor(row["chosen_input_ids"], dtype=torch.long).unsqueeze(0)
        rejected_ids = torch.tensor(row["rejected_input_ids"], dtype=torch.long).unsqueeze(0)
        item = (
            chosen_ids,
            torch.ones_like(chosen_ids),
            rejected_ids,
            torch.ones_like(rejected_ids),
            prompt_len,
            self._logprob_mask("chosen", idx, prompt_len, chosen_ids.shape[1]),
            self._logprob_mask("rejected", idx, prompt_len, rejected_ids.shape[1]),
        )
        if self.nll_skip_bad:
            item += (self._logprob_mask("chosen", idx, prompt_len, chosen_ids.shape[1], self.nll_skip),)
        return item

    def collate_fn(self, item_list):
        """Right-pad as OpenRLHF's ``RewardDataset.collate_fn`` (is_dpo): ids with pad_token_id, masks with 0."""
        from openrlhf.utils.utils import zero_pad_sequences

        chosen_ids, chosen_att, rejected_ids, rejected_att, prompt_lens, chosen_sel, rejected_sel, *skip = zip(*item_list)
        pad = self.tokenizer.pad_token_id
        return (
            zero_pad_sequences(list(chosen_ids), side="right", value=pad),
            zero_pad_sequences(list(chosen_att), side="right"),
            zero_pad_sequences(list(rejected_ids), side="right", value=pad),
            zero_pad_sequences(list(rejected_att), side="right"),
            KeyTokens(
                list(prompt_lens),
                zero_pad_sequences(list(chosen_sel), side="right", value=False),
                zero_pad_sequences(list(rejected_sel), side="right", value=False),
                zero_pad_sequences(list(skip[0]), side="right", value=False) if skip else None,
            ),
        )
