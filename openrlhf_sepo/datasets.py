"""``score_tokens`` output -> OpenRLHF DPO batches with key-token selection masks (SePO step 4, at load time).

A scores dir holds ``data/*.parquet`` (columns ``index``, ``prompt_len``, ``chosen_input_ids``,
``rejected_input_ids``, ``chosen_scores``, ``rejected_scores``; score j belongs to the token at absolute
position ``prompt_len + j``) and ``manifest.json`` (``tokenizer.name_or_path``, ``tokenizer.fingerprint``,
``data.max_len``, ``complete``). The ids are exactly those OpenRLHF's ``RewardDataset(is_dpo=True)`` made at
scoring time, so training reads them as they are and never re-tokenizes.
"""

import json
import os
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from openrlhf_sepo.scoring import num_selected, select_key_tokens, tokenizer_fingerprint

SELECTION_MODES = ("per_response", "global", "random")
REQUIRED_COLUMNS = ("prompt_len", "chosen_input_ids", "rejected_input_ids", "chosen_scores", "rejected_scores")
_ROWS_PER_CHUNK = 512  # per_response selection pads this many rows at a time (bounded memory)


class DataStrategy:
    """The slice of OpenRLHF's ``DeepspeedStrategy`` that its ``blending_datasets`` and ``RewardDataset`` read:
    ``args.data`` (the ``--data.*`` flags), ``args.use_ms``, ``print`` and ``is_rank_0``.

    Scoring and evaluation tokenize exactly as ``train_dpo`` does, through those OpenRLHF pieces, without building
    a DeepSpeed engine. Prints on ``rank`` 0; ``quiet`` prints nothing (there ``is_rank_0`` only gates prints).
    """

    def __init__(self, data, rank: int = 0, quiet: bool = False):
        self.args = SimpleNamespace(data=data, use_ms=False)
        self.rank, self.quiet = rank, quiet

    def is_rank_0(self):
        return self.rank == 0 and not self.quiet

    def print(self, *msg):
        if self.is_rank_0():
            print(*msg, flush=True)


class ScoreDataError(ValueError):
    """Bad scores dir, manifest, row, or selection setting; raised before any training step."""


class KeyTokens(NamedTuple):
    """The 5th element of a ``TokenScoreDataset`` batch: OpenRLHF's prompt lengths plus the two selection masks.

    ``chosen_mask`` is [B, Lc-1] and ``rejected_mask`` [B, Lr-1] (bool) for chosen / rejected ids of width Lc /
    Lr, in log-prob layout: entry t is True iff the token ids[t+1] is selected. Prompt and padding are False.
    """

    prompt_id_lens: list
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor


def read_manifest(score_dir: str) -> dict:
    """The manifest of one finished ``score_tokens`` output dir, or a ``ScoreDataError`` saying what is wrong."""
    if not os.path.isdir(score_dir):
        raise ScoreDataError(f"scores dir {score_dir!r} does not exist (expected a score_tokens output dir)")
    path = os.path.join(score_dir, "manifest.json")
    if not os.path.isfile(path):
        raise ScoreDataError(f"{score_dir!r} has no manifest.json: not a score_tokens output dir")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        fingerprint = manifest["tokenizer"]["fingerprint"]
        manifest["data"]["max_len"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ScoreDataError(f"{path} is not a valid scores manifest ({type(e).__name__}: {e})") from None
    if manifest.get("complete") is not True:
        raise ScoreDataError(f"{path}: scoring did not complete ('complete' is not true); re-run score_tokens")
    if not fingerprint:
        raise ScoreDataError(f"{path}: empty tokenizer fingerprint")
    return manifest


def open_scores(score_dir: str, tokenizer, columns, max_samples: int = 100000000):
    """(manifest, rows) of one finished scores dir for training with ``tokenizer``: the first ``max_samples`` rows as
    an HF dataset. ``ScoreDataError`` if the scores were made with another tokenizer (manifest fingerprint: the scored
    ids would not be the trained ids), the parquet is missing, or it lacks one of ``columns``."""
    import datasets as hf_datasets

    manifest = read_manifest(score_dir)
    expected = tokenizer_fingerprint(tokenizer)
    if manifest["tokenizer"]["fingerprint"] != expected:
        raise ScoreDataError(
            f"{score_dir!r} was scored with tokenizer {manifest['tokenizer'].get('name_or_path')!r} "
            f"(fingerprint {manifest['tokenizer']['fingerprint']}), but training uses "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} (fingerprint {expected}): the scored ids would "
            "not be the trained ids. Re-score with the policy's tokenizer."
        )
    data_dir = os.path.join(score_dir, "data")
    if not os.path.isdir(data_dir) or not any(f.endswith(".parquet") for f in os.listdir(data_dir)):
        raise ScoreDataError(f"{score_dir!r} has no data/*.parquet")
    part = hf_datasets.load_dataset("parquet", data_dir=data_dir, split="train")
    missing = [c for c in columns if c not in part.column_names]
    if missing:
        raise ScoreDataError(f"{score_dir!r}: parquet lacks columns {missing}")
    return manifest, part.select(range(min(max_samples, len(part))))


def _list_column(table, name):
    """(flat numpy values, per-row lengths) of a list column of a pyarrow table."""
    import pyarrow.compute as pc

    column = table.column(name).combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), lengths


def common_prefix_lengths(chosen_flat, chosen_lens, rejected_flat, rejected_lens, prompt_len):
    """P per row: the number of leading response tokens (ids after ``prompt_len``) equal in chosen and rejected.

    Flat ids with per-row lengths (as ``_list_column`` gives them); vectorised, no loop over rows or tokens.
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


def _first_rows(bad, indices, limit=5):
    rows = np.flatnonzero(bad)[:limit]
    return ", ".join(f"row {r} (index={indices[r]})" for r in rows) + (" ..." if bad.sum() > limit else "")


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
        exclude_common_prefix: the pair's common prefix, its first P response tokens equal in chosen and rejected
            (same context, same token, so the same score and no preference signal), is ineligible on both sides:
            response position j is eligible iff j >= min(P, N - 1) for a response of N tokens (the cap keeps the
            last token eligible, so E >= 1 even when one response is a prefix of the other). False (default, as
            published SePO): every response token is eligible. Off by default because the benchmark
            (docs/benchmark.md) measured no gain from it: none with the NLL term, a loss without it.
        seed: seed of the ``random`` selection (train_sepo passes ``--train.seed``); unused by the other modes.
        max_samples: at most this many rows per scores dir and in total (as OpenRLHF's ``--data.max_samples``).

    Item: ``(chosen_ids [1, Lc], chosen_attention, rejected_ids [1, Lr], rejected_attention, prompt_len,
    chosen_mask [1, Lc-1], rejected_mask [1, Lr-1])``: RewardDataset's DPO item plus the two selection masks in
    log-prob layout. Batch (``collate_fn``): OpenRLHF's DPO 5-tuple ``(chosen_ids, chosen_attention, rejected_ids,
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
    ) -> None:
        super().__init__()
        import datasets as hf_datasets

        if selection not in SELECTION_MODES:
            raise ScoreDataError(f"selection must be one of {SELECTION_MODES}, got {selection!r}")
        for name, k in (("k_chosen", k_chosen), ("k_rejected", k_rejected)):
            if not 0.0 < k <= 1.0:
                raise ScoreDataError(f"{name} must be in (0, 1], got {k}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.strategy = strategy
        self.k_chosen, self.k_rejected, self.selection = k_chosen, k_rejected, selection
        self.exclude_common_prefix, self.seed = exclude_common_prefix, seed
        log = strategy.print if strategy is not None else print

        parts, prompt_lens, prefixes, scores = [], [], [], {"chosen": ([], []), "rejected": ([], [])}
        for score_dir in [d.strip() for d in dataset.split(",") if d.strip()]:
            manifest, part = open_scores(score_dir, tokenizer, REQUIRED_COLUMNS, max_samples)
            table = part.with_format("arrow")[:]
            self._check_rows(score_dir, manifest, table, prompt_lens, scores)
            prefixes.append(common_prefix_lengths(*_list_column(table, "chosen_input_ids"),
                                                  *_list_column(table, "rejected_input_ids"), prompt_lens[-1]))
            parts.append(part)
            log(f"TokenScoreDataset: {len(part)} pairs from {score_dir}")
        if not parts:
            raise ScoreDataError(f"no scores dir given (dataset={dataset!r})")

        total = min(max_samples, sum(len(p) for p in parts))
        self.data = hf_datasets.concatenate_datasets(parts).select(range(total))
        self.prompt_lens = np.concatenate(prompt_lens)[:total]
        self.common_prefix = np.concatenate(prefixes)[:total]  # P per pair, whether excluded or not
        # Flat per-token selection for each side, with row offsets: one byte per scored token.
        self.selected, self.offsets = {}, {}
        generator = torch.Generator().manual_seed(seed)
        excluded_total = 0
        for side, k, largest in (("chosen", k_chosen, True), ("rejected", k_rejected, False)):
            values = np.concatenate(scores[side][0])
            lengths = np.concatenate(scores[side][1])[:total]
            values = torch.from_numpy(values[: lengths.sum()])
            # first eligible response position per row: min(P, N - 1), or 0 when nothing is excluded
            excluded = np.minimum(self.common_prefix, lengths - 1) if exclude_common_prefix else np.zeros_like(lengths)
            excluded_total += int(excluded.sum())
            if selection == "random":  # uniform keys, drawn whatever the scores, then per_response's rule
                values = torch.rand(len(values), generator=generator, dtype=torch.float64)
            self.offsets[side] = np.concatenate([[0], np.cumsum(lengths)])
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
        log(f"TokenScoreDataset: {total} pairs, {selection} selection keeps {kept}/{scored} response tokens")

    def _check_rows(self, score_dir, manifest, table, prompt_lens, scores):
        """Reject rows whose ids, prompt length and scores do not fit together, naming them."""
        indices = table.column("index").to_numpy() if "index" in table.column_names else np.arange(table.num_rows)
        prompt_len = table.column("prompt_len").to_numpy().astype(np.int64)
        problems = [(prompt_len < 1, "has prompt_len < 1: its first response token has no log-prob to train")]
        for side in ("chosen", "rejected"):
            _, n_ids = _list_column(table, f"{side}_input_ids")
            values, n_scores = _list_column(table, f"{side}_scores")
            values = values.astype(np.float64)
            finite = np.isfinite(values)
            bad_values = np.zeros(table.num_rows, dtype=bool)
            bad_values[np.repeat(np.arange(table.num_rows), n_scores)[~finite]] = True
            problems += [
                (n_scores != n_ids - prompt_len, f"has len({side}_scores) != len({side}_input_ids) - prompt_len"),
                (n_scores < 1, f"has an empty {side} response"),
                (bad_values, f"has NaN or infinite {side}_scores"),
                (
                    n_ids > self.max_length,
                    f"has {side} ids longer than --data.max_len {self.max_length} (scored with max_len "
                    f"{manifest['data']['max_len']}): raise --data.max_len or re-score with a smaller one",
                ),
            ]
            scores[side][0].append(values)
            scores[side][1].append(n_scores)
        for bad, what in problems:
            if bad.any():
                raise ScoreDataError(f"{score_dir!r}: {int(bad.sum())} row(s) {what}: {_first_rows(bad, indices)}")
        prompt_lens.append(prompt_len)

    def _select(self, values, lengths, excluded, k, largest, log):
        """Flat bool selection over all responses of one side (see the class docstring for the modes).

        ``values``: flat scores (random keys for ``random``); ``lengths``: N per row; ``excluded``: per row, the
        number of leading response tokens that are ineligible (0 <= excluded < N).
        """
        rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(len(values)) - starts[rows]
        if self.selection in ("per_response", "random"):
            selected = torch.zeros(len(values), dtype=torch.bool)
            for first in range(0, len(lengths), _ROWS_PER_CHUNK):
                last = min(first + _ROWS_PER_CHUNK, len(lengths))
                lo, hi = int(starts[first]), int(starts[last - 1] + lengths[last - 1])
                width = int(lengths[first:last].max())
                padded = torch.zeros(last - first, width, dtype=values.dtype)
                padded[rows[lo:hi] - first, positions[lo:hi]] = values[lo:hi]
                eligible = torch.arange(width).unsqueeze(0) >= excluded[first:last].unsqueeze(1)
                mask = select_key_tokens(padded, k, largest, lengths[first:last], eligible)
                selected[lo:hi] = mask[rows[lo:hi] - first, positions[lo:hi]]
            return selected.numpy()
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

    def _logprob_mask(self, side, idx, prompt_len, width):
        """Selection of row idx in log-prob layout [1, width-1]: score j -> token prompt_len + j -> entry prompt_len + j - 1."""
        mask = torch.zeros(1, width - 1, dtype=torch.bool)
        mask[0, prompt_len - 1 :] = torch.from_numpy(self.selected[side][self.offsets[side][idx] : self.offsets[side][idx + 1]])
        return mask

    def __getitem__(self, idx):
        row = self.data[idx]
        prompt_len = int(self.prompt_lens[idx])
        chosen_ids = torch.tensor(row["chosen_input_ids"], dtype=torch.long).unsqueeze(0)
        rejected_ids = torch.tensor(row["rejected_input_ids"], dtype=torch.long).unsqueeze(0)
        return (
            chosen_ids,
            torch.ones_like(chosen_ids),
            rejected_ids,
            torch.ones_like(rejected_ids),
            prompt_len,
            self._logprob_mask("chosen", idx, prompt_len, chosen_ids.shape[1]),
            self._logprob_mask("rejected", idx, prompt_len, rejected_ids.shape[1]),
        )

    def collate_fn(self, item_list):
        """Right-pad as OpenRLHF's ``RewardDataset.collate_fn`` (is_dpo): ids with pad_token_id, masks with 0."""
        from openrlhf.utils.utils import zero_pad_sequences

        chosen_ids, chosen_att, rejected_ids, rejected_att, prompt_lens, chosen_sel, rejected_sel = zip(*item_list)
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
            ),
        )
