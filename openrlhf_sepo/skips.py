"""Rows a data set skips: a ``Skip`` names its reason and says why, a ``SkipCounter`` counts them.

Every row tokenizer (``rows.RowTokenizer``, ``rows.CrossRowTokenizer``) and every data set built on one
(``token_rm_data.RankedListDataset``, ``tkpo_data.CounterfactualSFTDataset``, ``score_tokens``' shards) returns
either its row or a ``Skip``; ``isinstance(result, Skip)`` tells them apart. A skip is never an error: the row is
counted by reason, its index and message kept as an example, and one report names the first row of each reason.
"""

from typing import NamedTuple


class Skip(NamedTuple):
    """A row that is not kept: ``reason`` is one of the data set's declared reasons, ``message`` says what is wrong."""

    reason: str
    message: str


class SkipCounter:
    """Skipped rows by reason: ``counts[reason]``, and ``examples[reason]``, the first ``kept`` ``(index, message)``
    pairs in the order added (every one with ``kept=None``).

    ``reasons`` declares reasons counted even when 0 (a manifest lists every reason); a reason not declared is
    added when first seen, so ``counts`` reads like a ``Counter`` of the rows skipped.
    """

    def __init__(self, reasons=(), kept=5):
        self.counts = dict.fromkeys(reasons, 0)
        self.examples = {}
        self.kept = kept

    def add(self, index: int, skip: Skip):
        self.counts[skip.reason] = self.counts.get(skip.reason, 0) + 1
        bucket = self.examples.setdefault(skip.reason, [])
        if self.kept is None or len(bucket) < self.kept:
            bucket.append((index, skip.message))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, line: str = "  skipped {n} ({reason}), e.g. row {index}: {message}") -> list:
        """One line per reason with a skipped row, in the order first seen: ``line`` formatted with the count ``n``,
        the ``reason`` and the ``index`` and ``message`` of its first example."""
        return [line.format(n=self.counts[reason], reason=reason, index=index, message=message)
                for reason, ((index, message), *_) in self.examples.items() if self.counts[reason]]

    def labelled_examples(self) -> dict:
        """``{reason: ["row INDEX: message", ...]}``: the examples as a data set's ``skip_examples`` shows them."""
        return {reason: [f"row {index}: {message}" for index, message in bucket] for reason, bucket in self.examples.items()}

    def to_records(self) -> list:
        """Every kept example as ``{"index", "reason", "message"}``, by row index (a scores-dir shard record's form)."""
        return sorted(({"index": index, "reason": reason, "message": message}
                       for reason, bucket in self.examples.items() for index, message in bucket), key=lambda e: e["index"])

    def add_records(self, counts: dict, records: list):
        """Merge another counter's ``counts`` and ``to_records()``; examples stay by row index within each call."""
        for reason, n in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        for record in sorted(records, key=lambda e: e["index"]):
            bucket = self.examples.setdefault(record["reason"], [])
            if self.kept is None or len(bucket) < self.kept:
                bucket.append((record["index"], record["message"]))
