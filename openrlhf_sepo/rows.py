"""Row tokenization: preference and SFT rows, with OpenRLHF's own dataset classes' rules.

The ids scored are the ids trained: ``RowTokenizer`` makes exactly the ids of OpenRLHF's
``RewardDataset(is_dpo=True)`` (its ``preprocess_data`` for the strings, its rules for the ids, the tokenizer called
once per list of rows: ``openrlhf_internals.dpo_texts`` / ``dpo_ids``), and ``SFTRowTokenizer`` runs ``SFTDataset``'s
own ``process_data`` and ``__getitem__`` on a single row, so every id, template and truncation is the trainer's.
What differs is that a row that cannot be kept comes back as a ``skips.Skip`` (reason, message) instead of being
dropped without a trace.

- ``RowTokenizer``: preference rows (``score_tokens``, ``token_rm_data``, ``evaluate``), with ``--data.prompt_split``
  for rows with no prompt column (``hh.split_prompt``).
- ``CrossRowTokenizer``: ``score_tokens --policy.tokenizer``, each row tokenized by the policy and by the oracle,
  with the ``token_map.TokenMap`` per response that moves oracle-token scores onto the policy's tokens.
- ``SFTRowTokenizer``: SFT rows (``tkpo_data``).
- ``NoRows``: the empty data set a parent class is built on, so it sets up its tokenizer state with no rows.
- ``DataStrategy``: the slice of OpenRLHF's ``DeepspeedStrategy`` those classes and ``blending_datasets`` read.
"""

from types import SimpleNamespace

from openrlhf.datasets import RewardDataset, SFTDataset

from openrlhf_sepo import openrlhf_internals
from openrlhf_sepo.hh import DEFAULT_MARKER, split_prompt
from openrlhf_sepo.skips import Skip
from openrlhf_sepo.token_map import MappingError, map_tokens, response_tokens, special_ids


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


class NoRows:
    """An empty stand-in data set: lets ``RewardDataset`` / ``SFTDataset.__init__`` set up their tokenizer state
    with no rows to map (the row tokenizers below feed them their rows themselves)."""

    column_names = []

    def map(self, *args, **kwargs):
        return self

    def filter(self, *args, **kwargs):
        return self

    def __getitem__(self, column):
        return []


class RowTokenizer(RewardDataset):
    """OpenRLHF's ``RewardDataset(is_dpo=True)``, row by row or a list of rows at once, keeping each row's index.

    RewardDataset tokenizes the whole data set in its constructor and drops a long-prompt row without a trace;
    here ``encode_many`` makes each row's strings with its own ``preprocess_data`` and its ids by its rules
    (``openrlhf_internals.dpo_texts`` / ``dpo_ids``: prompt length from the prompt alone, EOS forced at the end,
    truncation at max_len), the tokenizer called twice for the whole list, so the ids are exactly the trainer's,
    and every row that is not kept comes back as a ``Skip``. ``encode(row)`` is ``encode_many([row])[0]``.

    With ``--data.prompt_split marker|common_prefix`` a row with no prompt column is first split by
    ``openrlhf_sepo.hh.split_prompt`` and handed on as a ``{"prompt", "chosen", "rejected"}`` row with prompt key
    ``"prompt"``: OpenRLHF's own prompt-key path then makes the ids, and only the final answers are response tokens.
    """

    def __init__(self, tokenizer, strategy):
        data = strategy.args.data
        super().__init__(NoRows(), tokenizer, data.max_len, strategy, input_template=data.input_template,
                         is_dpo=True, num_processors=1)
        self.prompt_split = getattr(data, "prompt_split", "none")
        self.assistant_marker = getattr(data, "assistant_marker", DEFAULT_MARKER)
        # The keys _check reads in a row as the data set has it; a split row has OpenRLHF's keys below.
        self.row_keys = [self.chosen_key, self.rejected_key] + ([self.prompt_key] if self.prompt_key else [])
        # Per row of the last tokenize_many call: the (prompt, chosen, reject) strings its ids were made from, or
        # None for a row skipped before it had any (CrossRowTokenizer maps responses by them).
        self.texts = []
        if self.prompt_split != "none":
            if self.prompt_key:  # before anything is written: a prompt column and a split would disagree
                raise SystemExit(f"--data.prompt_split {self.prompt_split} makes the prompt from chosen and "
                                 f"rejected: drop --data.prompt_key {self.prompt_key!r} (or use --data.prompt_split none)")
            self.prompt_key, self.chosen_key, self.rejected_key = "prompt", "chosen", "rejected"

    def encode(self, row):
        """-> (prompt_len, chosen_ids, rejected_ids), or a ``Skip``."""
        return self.encode_many([row])[0]

    def encode_many(self, rows):
        """``encode`` of every row, in order, the tokenizer called on all of them at once."""
        return [Skip("identical_responses", "chosen and rejected are identical")
                if not isinstance(result, Skip) and result[1] == result[2] else result
                for result in self.tokenize_many(rows)]

    def tokenize(self, row):
        """``encode`` without its identical-responses check (``RankedListDataset`` tokenizes one response as both)."""
        return self.tokenize_many([row])[0]

    def tokenize_many(self, rows):
        """``tokenize`` of every row, in order: the strings row by row, the ids of all of them in one batch."""
        self.texts = [self._texts(row) for row in rows]
        kept = [t for t in self.texts if not isinstance(t, Skip)]
        encoded = iter(openrlhf_internals.dpo_ids(self, kept))
        results = [texts if isinstance(texts, Skip) else self._result(*next(encoded)) for texts in self.texts]
        self.texts = [None if isinstance(t, Skip) else t for t in self.texts]
        return results

    def _texts(self, row):
        """The row's (prompt, chosen, reject) strings as ``process_data`` makes them, or a ``Skip``."""
        problem = self._check(row)
        if problem:
            return problem
        if self.prompt_split != "none":
            row = self._split(row)
            if isinstance(row, Skip):
                return row
        return openrlhf_internals.dpo_texts(self, row)

    def _result(self, prompt_len, chosen_ids, rejected_ids):
        if chosen_ids is None:  # RewardDataset drops it silently
            return Skip("prompt_too_long",
                        f"prompt of {prompt_len} tokens leaves < 2 response tokens in max_len {self.max_length}")
        if prompt_len == 0:
            return Skip("empty_prompt", "the prompt is empty (set --data.prompt_key or --data.apply_chat_template, or "
                                        "--data.prompt_split for rows with no prompt column)")
        shortest = min(len(chosen_ids), len(rejected_ids)) - prompt_len
        if shortest < 2:
            return Skip("prompt_too_long", f"only {shortest} response token(s) left within max_len {self.max_length}")
        return prompt_len, chosen_ids, rejected_ids

    def _check(self, row):
        keys = self.row_keys
        for key in keys:
            if row.get(key) is None:
                return Skip("missing_key", f"key {key!r} is missing or null")
        for key in keys:
            if not _is_text(row[key], messages=bool(self.apply_chat_template)):
                kind = "a list of {'role', 'content': str} messages" if self.apply_chat_template else "a string"
                return Skip("non_text", f"{key!r} is not {kind}: {str(row[key])[:80]!r}")
        return self._check_answers(row, keys[:2])

    def _check_answers(self, row, keys):
        for key in keys:
            value = row[key]
            text = value if isinstance(value, str) else (value[-1]["content"] if value else "")
            if not text.strip():
                return Skip("empty_response", f"{key!r} is empty or whitespace-only")
        return None

    def _split(self, row):
        """--data.prompt_split: the row as {"prompt", "chosen", "rejected"}, or a ``Skip``."""
        chosen, rejected = row[self.row_keys[0]], row[self.row_keys[1]]
        if chosen == rejected:  # would split into identical answers; say so rather than "no shared prompt"
            return Skip("identical_responses", "chosen and rejected are identical")
        parts = split_prompt(chosen, rejected, self.prompt_split, self.assistant_marker)
        if parts is None:
            rule = ("the messages before the last (assistant) one differ" if isinstance(chosen, list) else
                    f"chosen has no {self.assistant_marker!r}, or rejected does not start with chosen up to its last one"
                    if self.prompt_split == "marker" else "no common prefix up to a marker or whitespace")
            return Skip("no_shared_prompt", f"--data.prompt_split {self.prompt_split}: {rule}")
        split = dict(zip(("prompt", "chosen", "rejected"), parts))
        problem = self._check_answers(split, ("chosen", "rejected"))
        return problem or split


def _is_text(value, messages):
    if not messages:
        return isinstance(value, str)
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


class CrossRowTokenizer:
    """``--policy.tokenizer``: each row tokenized twice by RowTokenizer, with the policy's tokenizer (the ids written)
    and with the oracle's (the ids scored); token_map.py maps the oracle-token scores onto the policy's tokens.

    ``encode`` -> (oracle prompt_len, oracle chosen_ids, oracle rejected_ids, (policy prompt_len, chosen_ids,
    rejected_ids), (chosen TokenMap, rejected TokenMap)), or a ``Skip``. ``tokenizer`` is the oracle's: the
    batches made of these items are the oracle's ids (the scorer pads them; their scores are then mapped).
    """

    def __init__(self, policy, oracle):
        self.policy, self.oracle, self.tokenizer = policy, oracle, oracle.tokenizer
        self.specials = {"policy": special_ids(policy.tokenizer), "oracle": special_ids(oracle.tokenizer)}

    def encode(self, row):
        return self.encode_many([row])[0]

    def encode_many(self, rows):
        """``encode`` of every row, in order; each side's tokenizer called on all of them at once."""
        sides = {}
        for name, rt in (("policy", self.policy), ("oracle", self.oracle)):
            sides[name] = list(zip(rt.encode_many(rows), rt.texts))
        return [self._combine(sides["policy"][i], sides["oracle"][i]) for i in range(len(rows))]

    def _combine(self, policy, oracle):
        """One row's two tokenizations, each (result, texts) -> the row's item, or a ``Skip``."""
        if isinstance(policy[0], Skip):  # a policy-side skip reads as without the flag
            return policy[0]
        if isinstance(oracle[0], Skip):
            return oracle[0]._replace(message=f"oracle tokenizer: {oracle[0].message}")
        sides = {"policy": policy, "oracle": oracle}
        maps = []
        for k, side in enumerate(("chosen", "rejected")):
            texts = {}
            for name, rt in (("policy", self.policy), ("oracle", self.oracle)):
                (prompt_len, *ids), strings = sides[name]
                try:
                    texts[name] = response_tokens(rt.tokenizer, strings[0], strings[1 + k], ids[k], prompt_len,
                                                  rt.max_length, self.specials[name])
                except MappingError as e:
                    return Skip("mapping_failed", f"{side}: {e}")
            try:
                maps.append(map_tokens(*texts["oracle"], *texts["policy"]))
            except MappingError as e:
                return Skip("mapping_failed", f"{side}: {e}")
        return (*oracle[0], policy[0], tuple(maps))


class SFTRowTokenizer(SFTDataset):
    """OpenRLHF's ``SFTDataset``, one row at a time (``RowTokenizer`` is ``RewardDataset``'s, batched): its own
    ``process_data`` and ``__getitem__`` make the ids, so they are exactly ``train_sft``'s."""

    def __init__(self, tokenizer, max_length, strategy):
        super().__init__(NoRows(), tokenizer, max_length, strategy, input_template=strategy.args.data.input_template,
                         num_processors=1)

    def encode(self, row):
        """-> (ids [1, L], attention [1, L], loss_mask [1, L], prompt length), or None for a prompt too long."""
        out = self.process_data(dict(row))
        if out["prompt"] is None:
            return None
        openrlhf_internals.set_single_sft_row(self, out["prompt"], out["response"], out["prompt_ids_len"])
        ids, att, loss_mask = self[0]
        return ids, att, loss_mask, out["prompt_ids_len"]
