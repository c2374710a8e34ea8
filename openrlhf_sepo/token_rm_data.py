"""Ranked lists (or ordinary preference pairs) -> token reward model batches (``train_token_rm``).

A *ranked list* row holds a prompt, a list of K responses and a list of K preference scores (higher is better;
column names ``--data.prompt_key``, ``--data.responses_key``, ``--data.scores_key``). A *pair* row is OpenRLHF's
preference row (``--data.chosen_key`` / ``--data.rejected_key``, prompt as ``train_dpo`` reads it): a list of two
with scores (1, 0). Which one a data set holds is read from its columns.

Every response is tokenized exactly as OpenRLHF's ``RewardDataset(is_dpo=True)`` tokenizes a chosen response
(through ``rows.RowTokenizer``: input template or chat template, EOS forced, truncation at max_len), so a
token reward model sees the ids that ``score_tokens --scorer token_rm`` later scores.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from openrlhf.utils.utils import zero_pad_sequences
from torch.utils.data import Dataset

from openrlhf_sepo.rows import RowTokenizer
from openrlhf_sepo.skips import Skip, SkipCounter

LIST_SKIPS = (
    "missing_key",  # the prompt, responses or scores column absent or null
    "non_text",  # a prompt or response that is neither text nor (with a chat template) a message list
    "score_count_mismatch",  # len(scores) != len(responses)
    "bad_score",  # a score that is not a finite number
    "prompt_too_long",  # the prompt leaves fewer than 2 response tokens within max_len
    "too_few_responses",  # fewer than 2 responses left (after dropping empty ones)
    "all_tied",  # every score equal: the list orders nothing
    "identical_responses",  # a pair whose chosen and rejected tokenize alike
    "empty_prompt",  # a pair with no prompt (set --data.prompt_key or --data.apply_chat_template)
    "empty_response",  # a pair with an empty side
)
SKIP_EXAMPLES_KEPT = 5


class ListDataError(ValueError):
    """Data that cannot make a single usable list, or a missing column: raised before any model loads."""


class ListBatch(NamedTuple):
    """5th element of a ``RankedListDataset`` batch: responses per list and each response's preference score."""

    sizes: list
    scores: list


class RankedListDataset(Dataset):
    """Ranked lists of responses to one prompt, each list kept whole, sorted best first.

    Args:
        dataset: rows as ``blending_datasets`` returns them (a ranked-list or a pair data set, see the module doc).
        tokenizer, strategy: as OpenRLHF's ``RewardDataset``; ``strategy.args.data`` holds the ``--data.*`` flags
            (prompt / chosen / rejected / responses / scores keys, input or chat template, max_len).
        seed: preference ties inside a list are broken at random, once, with this seed (ListMLE needs one order).

    Skips (a ``skips.SkipCounter`` in ``skips``: counted by reason in ``skipped``, the first examples in
    ``skip_examples``, printed): see ``LIST_SKIPS``. Empty responses are dropped from their list (``dropped_empty_responses``); a list left with
    fewer than 2 responses is skipped.

    Item: ``(ids: list of K 1-D long tensors, prompt_len: int, scores: list of K floats)``, best first.
    Batch (``collate_fn``): ``(input_ids [N, T], attention_mask [N, T], response_mask [N, T] bool,
    layout [N, 2] float64 (list index in the batch, preference score), ListBatch)``, right-padded, lists
    contiguous: the 5-tuple OpenRLHF's ``RewardModelTrainer`` loops unpack (see ``token_rm_trainer.py``).
    """

    def __init__(self, dataset, tokenizer, strategy, seed=0, name="data"):
        super().__init__()
        self.tokenizer, self.strategy = tokenizer, strategy
        flags = strategy.args.data
        self.row_tokenizer = RowTokenizer(tokenizer, strategy)
        self.responses_key, self.scores_key = flags.responses_key, flags.scores_key
        columns = set(dataset.column_names)
        if self.responses_key in columns:
            self.kind = "lists"
            if not flags.prompt_key:
                raise ListDataError(f"{name}: ranked lists need --data.prompt_key (the prompt column; columns: "
                                 f"{sorted(columns)})")
            if self.scores_key not in columns:
                raise ListDataError(f"{name}: column --data.scores_key {self.scores_key!r} not found (columns: "
                                 f"{sorted(columns)})")
        elif flags.chosen_key in columns and flags.rejected_key in columns:
            self.kind = "pairs"
        else:
            raise ListDataError(
                f"{name}: neither a ranked-list column --data.responses_key {self.responses_key!r} nor the pair "
                f"columns --data.chosen_key {flags.chosen_key!r} / --data.rejected_key {flags.rejected_key!r} "
                f"(columns: {sorted(columns)})")

        rng = np.random.default_rng(seed)
        self.items, self.skips = [], SkipCounter(kept=SKIP_EXAMPLES_KEPT)
        self.dropped_empty_responses = 0
        for index, row in enumerate(dataset):
            result = self._encode_pair(row) if self.kind == "pairs" else self._encode_list(row)
            if isinstance(result, Skip):
                self.skips.add(index, result)
                continue
            prompt_len, ids, scores = result
            order = np.lexsort((rng.random(len(scores)), -np.asarray(scores)))  # score desc, ties at random
            self.items.append((prompt_len, [ids[i] for i in order], [float(scores[i]) for i in order]))
        self.skipped, self.skip_examples = self.skips.counts, self.skips.labelled_examples()
        sizes = [len(item[1]) for item in self.items]
        strategy.print(f"RankedListDataset ({name}): {len(self.items)} {self.kind} kept of {len(dataset)} rows, "
                       f"{sum(sizes)} responses (K {min(sizes, default=0)}-{max(sizes, default=0)}); skipped "
                       f"{dict(self.skipped) or 'none'}; empty responses dropped: {self.dropped_empty_responses}")
        for line in self.skips.report():
            strategy.print(line)
        if not self.items:
            raise ListDataError(f"{name}: no usable row (skipped by reason: {dict(self.skipped)})")

    def _encode_pair(self, row):
        out = self.row_tokenizer.encode(row)
        if isinstance(out, Skip):
            return out
        prompt_len, chosen, rejected = out  # lists of ids
        return prompt_len, [torch.tensor(chosen), torch.tensor(rejected)], [1.0, 0.0]

    def _encode_list(self, row):
        prompt, responses, scores = row.get(self.row_tokenizer.prompt_key), row.get(self.responses_key), row.get(self.scores_key)
        for key, value in ((self.row_tokenizer.prompt_key, prompt), (self.responses_key, responses), (self.scores_key, scores)):
            if value is None:
                return Skip("missing_key", f"{key!r} is missing or null")
        if not isinstance(responses, list) or not isinstance(scores, list):
            return Skip("non_text", f"{self.responses_key!r} and {self.scores_key!r} must be lists")
        if len(scores) != len(responses):
            return Skip("score_count_mismatch", f"{len(responses)} responses but {len(scores)} scores")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            return Skip("bad_score", f"scores {scores!r} are not all finite numbers")
        chat = bool(self.row_tokenizer.apply_chat_template)
        as_messages = lambda v, role: [{"role": role, "content": v}] if chat and isinstance(v, str) else v  # noqa: E731
        kept_ids, kept_scores, prompt_len = [], [], None
        for response, score in zip(responses, scores):
            text = response if isinstance(response, str) else (response[-1].get("content") if response else None)
            if isinstance(text, str) and not text.strip():
                self.dropped_empty_responses += 1
                continue
            pseudo = {self.row_tokenizer.prompt_key: as_messages(prompt, "user"),
                      self.row_tokenizer.chosen_key: as_messages(response, "assistant"),
                      self.row_tokenizer.rejected_key: as_messages(response, "assistant")}
            result = self.row_tokenizer.tokenize(pseudo)  # the response in both slots: its ids as train_dpo's
            if isinstance(result, Skip):
                return result
            prompt_len, ids, _ = result
            kept_ids.append(torch.tensor(ids))
            kept_scores.append(score)
        if len(kept_ids) < 2:
            return Skip("too_few_responses", f"{len(kept_ids)} non-empty response(s)")
        if len(set(kept_scores)) == 1:
            return Skip("all_tied", f"every score is {kept_scores[0]}")
        return prompt_len, kept_ids, kept_scores

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        prompt_len, ids, scores = self.items[idx]
        return ids, prompt_len, scores

    def collate_fn(self, item_list):
        seqs, prompt_lens, layout, sizes, scores = [], [], [], [], []
        for list_index, (ids, prompt_len, list_scores) in enumerate(item_list):
            seqs += ids
            prompt_lens += [prompt_len] * len(ids)
            layout += [(list_index, s) for s in list_scores]
            sizes.append(len(ids))
            scores.append(list_scores)
        input_ids = zero_pad_sequences(seqs, "right", self.tokenizer.pad_token_id, stack=True)
        attention = zero_pad_sequences([torch.ones_like(s) for s in seqs], "right", stack=True)
        width = input_ids.shape[1]
        positions = torch.arange(width).unsqueeze(0)
        response = (positions >= torch.tensor(prompt_lens).unsqueeze(1)) & attention.bool()
        return input_ids, attention, response, torch.tensor(layout, dtype=torch.float64), ListBatch(sizes, scores)
