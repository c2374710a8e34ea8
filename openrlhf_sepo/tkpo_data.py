"""SFT rows with a counterfactual prompt -> TKPO batches (``train_tkpo``).

Each row is an SFT row (prompt x, gold response y; ``--data.input_key`` / ``--data.output_key``, template or chat
template as OpenRLHF's ``train_sft``) plus its counterfactual prompt x', the same prompt with its style attribute
swapped: from a column (``--tkpo.counterfactual_key``), or made from an attribute column and a swap map
(``--tkpo.attribute_key``, ``--tkpo.swap_map``: x' is x with its first occurrence of the attribute replaced by
``swap_map[attribute]``).

Both sequences are tokenized exactly as OpenRLHF's ``SFTDataset`` tokenizes an SFT row (one row at a time through
its own ``process_data`` / ``__getitem__``: ``rows.SFTRowTokenizer``); the response must come out as the same ids at the end of both, so that
position t of the response is aligned by its offset (the prompts may tokenize to different lengths).
"""

import json
import os

import torch
from openrlhf.utils.utils import zero_pad_sequences
from torch.utils.data import Dataset

from openrlhf_sepo.rows import SFTRowTokenizer
from openrlhf_sepo.skips import Skip, SkipCounter

SKIPS = (
    "missing_key",  # the prompt, response, attribute or counterfactual column absent or null
    "empty_response",  # an empty or whitespace-only response
    "attribute_not_in_prompt",  # the attribute's text does not occur in the prompt
    "attribute_not_in_swap_map",  # no counterfactual attribute for it in --tkpo.swap_map
    "identical_counterfactual",  # x' == x: no contrast
    "prompt_too_long",  # fewer than 2 response tokens within max_len (either prompt)
    "response_differs",  # the response tokenizes differently after x and after x' (a merge across the boundary)
)
SKIP_EXAMPLES_KEPT = 5


class CounterfactualDataError(ValueError):
    """A flag or a data set that cannot make a single usable row: raised before any model loads."""


def load_swap_map(spec: str) -> dict:
    """``--tkpo.swap_map``: a JSON object, or a path to a JSON file holding one, ``{attribute: its swap}``."""
    try:
        text = open(spec, encoding="utf-8").read() if os.path.isfile(spec) else spec
        swap = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise CounterfactualDataError(f"--tkpo.swap_map: neither a JSON object nor a JSON file ({e})") from None
    if not isinstance(swap, dict) or not swap or not all(isinstance(k, str) and isinstance(v, str) and k != v
                                                         for k, v in swap.items()):
        raise CounterfactualDataError(f"--tkpo.swap_map must map attribute strings to other strings, got {swap!r}")
    return swap


class CounterfactualSFTDataset(Dataset):
    """(x, y) and (x', y) for TKPO, tokenized as OpenRLHF's ``SFTDataset``.

    Args:
        dataset: rows as ``blending_datasets`` returns them.
        tokenizer, max_length, strategy: as ``SFTDataset`` (``strategy.args.data``: input/output keys, templates).
        counterfactual_key: the column holding x'; or, when None, ``attribute_key`` and ``swap_map`` make x'.

    Skips (a ``skips.SkipCounter`` in ``skips``: counted in ``skipped``, first rows in ``skip_examples``, printed):
    ``SKIPS``.
    Item: ``(ids [1, L], attention [1, L], loss_mask [1, L], cf_ids [1, L'], cf_attention [1, L'])``; the loss mask is
    SFTDataset's (entry t is 1 iff token t + 1 is a response token). Batch (``collate_fn``): ``(inputs [B, 2, T],
    attention [B, 2, T], loss_mask [B, 1, T])``, row 0 of dim 1 the sequence (x, y), row 1 (x', y), right-padded:
    OpenRLHF's SFT 3-tuple, whose ``fit`` hands inputs and attention to the model as they are (``tkpo.TKPOActor``
    splits them) and the loss mask to the loss.
    """

    def __init__(self, dataset, tokenizer, max_length, strategy, counterfactual_key=None, attribute_key=None,
                 swap_map=None, name="--data.dataset"):
        super().__init__()
        self.tokenizer, self.max_length = tokenizer, max_length
        data = strategy.args.data
        self.input_key, self.output_key = data.input_key, data.output_key
        needed = [self.input_key, self.output_key, counterfactual_key or attribute_key]
        missing = [k for k in needed if k not in dataset.column_names]
        if missing:
            raise CounterfactualDataError(f"{name}: columns {missing} not found (columns: {dataset.column_names}); "
                                          "see --data.input_key, --data.output_key, --tkpo.counterfactual_key, "
                                          "--tkpo.attribute_key")

        one = SFTRowTokenizer(tokenizer, max_length, strategy)
        self.items, self.skips = [], SkipCounter(kept=SKIP_EXAMPLES_KEPT)
        for index, row in enumerate(dataset):
            result = self._encode(one, row, counterfactual_key, attribute_key, swap_map)
            if isinstance(result, Skip):
                self.skips.add(index, result)
            else:
                self.items.append(result)
        self.skipped, self.skip_examples = self.skips.counts, self.skips.labelled_examples()
        strategy.print(f"CounterfactualSFTDataset ({name}): {len(self.items)} of {len(dataset)} rows kept; skipped "
                       f"{dict(self.skipped) or 'none'}")
        for line in self.skips.report():
            strategy.print(line)
        if not self.items:
            raise CounterfactualDataError(f"{name}: no usable row (skipped by reason: {dict(self.skipped)})")

    def _encode(self, one, row, counterfactual_key, attribute_key, swap_map):
        prompt, response = row.get(self.input_key), row.get(self.output_key)
        for key, value in ((self.input_key, prompt), (self.output_key, response)):
            if value is None:
                return Skip("missing_key", f"{key!r} is missing or null")
        text = response if isinstance(response, str) else (response[-1].get("content", "") if response else "")
        if not str(text).strip():
            return Skip("empty_response", f"{self.output_key!r} is empty")
        if counterfactual_key:
            cf_prompt = row.get(counterfactual_key)
            if cf_prompt is None:
                return Skip("missing_key", f"{counterfactual_key!r} is missing or null")
        else:
            attribute = row.get(attribute_key)
            if attribute is None:
                return Skip("missing_key", f"{attribute_key!r} is missing or null")
            if attribute not in swap_map:
                return Skip("attribute_not_in_swap_map", f"attribute {attribute!r} has no entry in --tkpo.swap_map")
            if not isinstance(prompt, str) or attribute not in prompt:
                return Skip("attribute_not_in_prompt", f"attribute {attribute!r} does not occur in the prompt")
            cf_prompt = prompt.replace(attribute, swap_map[attribute], 1)
        if cf_prompt == prompt:
            return Skip("identical_counterfactual", "the counterfactual prompt equals the prompt")
        gold = one.encode(row)
        cf = one.encode({**row, self.input_key: cf_prompt})
        if gold is None or cf is None:
            return Skip("prompt_too_long", f"a prompt leaves < 2 response tokens within max_len {self.max_length}")
        ids, att, loss_mask, prompt_len = gold
        cf_ids, cf_att, _, cf_prompt_len = cf
        n = ids.shape[1] - prompt_len
        if n < 2 or cf_ids.shape[1] - cf_prompt_len < 2:
            return Skip("prompt_too_long", f"fewer than 2 response tokens within max_len {self.max_length}")
        if cf_ids.shape[1] - cf_prompt_len != n or not torch.equal(ids[0, -n:], cf_ids[0, -n:]):
            return Skip("response_differs", "the response tokenizes differently after the counterfactual prompt")
        return ids, att, loss_mask, cf_ids, cf_att

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        return self.items[idx]

    def collate_fn(self, item_list):
        """``zero_pad_sequences`` all 2B sequences (x, y) and (x', y) to one width W, then the loss masks to W."""
        ids, attention, loss_masks, cf_ids, cf_attention = zip(*item_list)
        interleave = lambda a, b: [t for pair in zip(a, b) for t in pair]  # noqa: E731  (row b: (x, y), then (x', y))
        inputs = zero_pad_sequences(interleave(ids, cf_ids), "right", self.tokenizer.pad_token_id)
        inputs = inputs.view(len(item_list), 2, -1)
        attention = zero_pad_sequences(interleave(attention, cf_attention), "right").view(len(item_list), 2, -1)
        width = torch.zeros(1, inputs.shape[-1])  # a row of width W, so the masks pad to W too
        loss_mask = zero_pad_sequences([*loss_masks, width], "right")[:-1].to(torch.float32).unsqueeze(1)
        return inputs, attention, loss_mask
