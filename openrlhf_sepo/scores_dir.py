"""The scores-dir format: the one module that writes, resumes, validates and reads ``score_tokens`` output.

A scores dir::

    manifest.json             {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": bool, "run_id",
                               "tokenizer": {"name_or_path", "fingerprint"}, "data": {"max_len", ...}, ...}
    data/shard-NNNNN.parquet  one row per kept pair, ``schema()``: index, prompt_len, chosen_input_ids,
                              rejected_input_ids, chosen_scores, rejected_scores (float32)
    shards/shard-NNNNN.json   shard NNNNN's record (its counts and statistics), written after its parquet

Score j of a side belongs to the token at absolute position ``prompt_len + j``: every response token, EOS included,
so ``len(side_scores) == len(side_input_ids) - prompt_len``. The ids are those OpenRLHF's ``RewardDataset(is_dpo=True)``
made (``rows.RowTokenizer``), so training reads them as they are and never re-tokenizes.

Writing and resuming (``score_tokens``): every file lands by atomic rename, a shard's parquet before its record, so a
shard is done iff its record exists; a rerun with the same ``run_id`` scores only the shards without one
(``prepare_output_dir``, ``pending_shards``), whatever the world size. The manifest says ``"complete": true`` last.

Reading (``TokenScoreDataset``, ``WeightedSFTDataset``, ``score_report``): ``read_manifest`` checks the format and
its version (a dir written before the version existed has neither field and reads as version 1), ``check_rows`` is
the one row validator, ``load`` the one multi-dir loader, ``padded_chunks`` the one way flat per-token values are
padded into bounded-memory [rows, width] blocks.
"""

import glob
import json
import os
import shutil
from typing import NamedTuple

import numpy as np
import torch

FORMAT = "openrlhf-sepo token scores"
FORMAT_VERSION = 1
SIDES = ("chosen", "rejected")
ROWS_PER_CHUNK = 512  # padded_chunks pads this many rows at a time (bounded memory)


class ScoreDataError(ValueError):
    """Bad scores dir, manifest, row, or selection setting; raised before any training step."""


def schema():
    """The parquet schema of a shard (pyarrow is imported only where a shard is written)."""
    import pyarrow as pa

    return pa.schema([
        ("index", pa.int64()), ("prompt_len", pa.int64()),
        ("chosen_input_ids", pa.list_(pa.int64())), ("rejected_input_ids", pa.list_(pa.int64())),
        ("chosen_scores", pa.list_(pa.float32())), ("rejected_scores", pa.list_(pa.float32())),
    ])


# ----------------------------------------------------------------------------------------------- writing


def new_manifest(sections: dict) -> dict:
    """A manifest of this format and version: its header, then ``sections`` in their order."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **sections}


def atomic_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)


def write_manifest(out, manifest):
    atomic_json(os.path.join(out, "manifest.json"), manifest)


def shard_path(out, shard, kind):
    """``data/shard-NNNNN.parquet`` (kind "parquet") or ``shards/shard-NNNNN.json`` (kind "json")."""
    return os.path.join(out, "data" if kind == "parquet" else "shards", f"shard-{shard:05d}.{kind}")


def prepare_output_dir(out, run_id, overwrite, rank):
    """The resume protocol's first step. Same run: resume. Another run's output, or a format this version cannot
    resume: ``ScoreDataError`` unless ``overwrite`` (then rank 0 deletes it). Every rank decides alike; rank 0 acts."""
    manifest_path = os.path.join(out, "manifest.json")
    has_shards = bool(glob.glob(os.path.join(out, "data", "*.parquet")) or glob.glob(os.path.join(out, "shards", "*.json")))
    previous = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        previous = manifest.get("run_id")
        if not overwrite:
            try:
                check_format(manifest, out)
            except ScoreDataError as e:
                raise ScoreDataError(f"--output_dir: {e}; or pass --overwrite to replace it, or pick another "
                                     "--output_dir") from None
    if overwrite:
        if rank == 0:
            for sub in ("data", "shards"):
                shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
            if os.path.exists(manifest_path):
                os.remove(manifest_path)
        return
    if (previous is not None and previous != run_id) or (previous is None and has_shards):
        raise ScoreDataError(
            f"--output_dir {out} holds another run's scores (run_id {previous}, this run {run_id}: different scorer, "
            "models, tokenizer, data flags or shard size); pass --overwrite to replace them, or pick another --output_dir"
        )


def start_run(out, manifest):
    """Rank 0, after ``prepare_output_dir``: make ``data/`` and ``shards/``, delete a killed run's half-written parquet,
    write ``manifest`` (a run's is not complete yet: ``"complete": true`` is written last)."""
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    for stale in glob.glob(os.path.join(out, "shards", ".shard-*.tmp-*")):
        os.remove(stale)
    write_manifest(out, manifest)


def pending_shards(out, shards):
    """The shards among ``shards`` that have no record yet: the ones a (resumed) run still scores."""
    return [s for s in shards if not os.path.exists(shard_path(out, s, "json"))]


def write_shard(out, shard, records, record_json):
    """Parquet first (``records``: dicts of ``schema()``'s columns; none for a shard that kept no pair), then its
    JSON record (the 'done' mark), both by atomic rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if records:
        table = pa.Table.from_pylist(records, schema=schema())
        tmp = os.path.join(out, "shards", f".shard-{shard:05d}.parquet.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, shard_path(out, shard, "parquet"))
    atomic_json(shard_path(out, shard, "json"), record_json)


def read_shard_records(out, n_shards):
    """The JSON records of shards 0 .. n_shards - 1, in order; RuntimeError naming a missing one."""
    records = []
    for shard in range(n_shards):
        path = shard_path(out, shard, "json")
        if not os.path.exists(path):
            raise RuntimeError(f"shard {shard} has no record ({path}) after all ranks finished")
        with open(path) as f:
            records.append(json.load(f))
    return records


def rewrite_scores(src, dst, score_fn):
    """A copy of scores dir ``src`` at ``dst`` (replaced) with every score replaced by ``score_fn(row, side)`` (one
    score per response token of that side; ``row`` a parquet row as a dict): same shards, ids, schema, manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    read_manifest(src, complete=False)  # a scores dir this version reads
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(os.path.join(dst, "data"))
    for name in sorted(os.listdir(os.path.join(src, "data"))):
        table = pq.read_table(os.path.join(src, "data", name))
        rows = table.to_pylist()
        for row in rows:
            for side in SIDES:
                row[f"{side}_scores"] = [float(x) for x in score_fn(row, side)]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), os.path.join(dst, "data", name))
    shutil.copy(os.path.join(src, "manifest.json"), os.path.join(dst, "manifest.json"))


# ----------------------------------------------------------------------------------------------- reading


def check_format(manifest, score_dir):
    """``ScoreDataError`` naming ``score_dir`` unless its manifest is this format at a version this code reads.
    A manifest with neither field is a dir written before they existed: version 1's layout, read as such."""
    fmt, version = manifest.get("format", FORMAT), manifest.get("format_version", FORMAT_VERSION)
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise ScoreDataError(
            f"scores dir {score_dir!r} is in format {fmt!r} version {version!r}, but this openrlhf-sepo reads "
            f"{FORMAT!r} version {FORMAT_VERSION} (or a dir from before versions were written): re-score it with "
            "this openrlhf-sepo, or read it with the one that wrote it")


def read_manifest(score_dir: str, complete: bool = True) -> dict:
    """The manifest of one ``score_tokens`` output dir (a finished one unless ``complete=False``), or a
    ``ScoreDataError`` saying what is wrong."""
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
    check_format(manifest, score_dir)
    if complete and manifest.get("complete") is not True:
        raise ScoreDataError(f"{path}: scoring did not complete ('complete' is not true); re-run score_tokens")
    if not fingerprint:
        raise ScoreDataError(f"{path}: empty tokenizer fingerprint")
    return manifest


def _parquet_dir(score_dir):
    data_dir = os.path.join(score_dir, "data")
    if not os.path.isdir(data_dir) or not any(f.endswith(".parquet") for f in os.listdir(data_dir)):
        raise ScoreDataError(f"{score_dir!r} has no data/*.parquet")
    return data_dir


def open_scores(score_dir: str, tokenizer, columns, max_samples: int = 100000000):
    """(manifest, rows) of one finished scores dir for training with ``tokenizer``: the first ``max_samples`` rows as
    an HF dataset. ``ScoreDataError`` if the scores were made with another tokenizer (manifest fingerprint: the scored
    ids would not be the trained ids), the parquet is missing, or it lacks one of ``columns``."""
    import datasets as hf_datasets

    from openrlhf_sepo.scoring import tokenizer_fingerprint

    manifest = read_manifest(score_dir)
    expected = tokenizer_fingerprint(tokenizer)
    if manifest["tokenizer"]["fingerprint"] != expected:
        raise ScoreDataError(
            f"{score_dir!r} was scored with tokenizer {manifest['tokenizer'].get('name_or_path')!r} "
            f"(fingerprint {manifest['tokenizer']['fingerprint']}), but training uses "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} (fingerprint {expected}): the scored ids would "
            "not be the trained ids. Re-score with the policy's tokenizer."
        )
    part = hf_datasets.load_dataset("parquet", data_dir=_parquet_dir(score_dir), split="train")
    missing = [c for c in columns if c not in part.column_names]
    if missing:
        raise ScoreDataError(f"{score_dir!r}: parquet lacks columns {missing}")
    return manifest, part.select(range(min(max_samples, len(part))))


def read_rows(score_dir):
    """(manifest, rows as dicts by index) of a scores dir, finished or not (``score_report``: a look at it)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(score_dir, complete=False)
    data_dir = _parquet_dir(score_dir)
    rows = []
    for name in sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet")):
        rows += pq.read_table(os.path.join(data_dir, name)).to_pylist()
    rows.sort(key=lambda r: r["index"])
    return manifest, rows


def list_column(table, name):
    """(flat numpy values, per-row lengths) of a list column of a pyarrow table."""
    import pyarrow.compute as pc

    column = table.column(name).combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), lengths


def _first_rows(bad, indices, limit=5):
    rows = np.flatnonzero(bad)[:limit]
    return ", ".join(f"row {r} (index={indices[r]})" for r in rows) + (" ..." if bad.sum() > limit else "")


def check_rows(score_dir, manifest, table, sides, max_length):
    """The row validator: ids, prompt length and scores of ``sides`` fit together, and the ids fit ``max_length``.

    -> (prompt_len [rows] int64, {side: (flat float64 scores, scores per row)}), or a ``ScoreDataError`` naming the
    dir, the problem and its first rows (``row r (index=i)``).
    """
    indices = table.column("index").to_numpy() if "index" in table.column_names else np.arange(table.num_rows)
    prompt_len = table.column("prompt_len").to_numpy().astype(np.int64)
    problems = [(prompt_len < 1, "has prompt_len < 1: its first response token has no log-prob to train")]
    scores = {}
    for side in sides:
        _, n_ids = list_column(table, f"{side}_input_ids")
        values, n_scores = list_column(table, f"{side}_scores")
        values = values.astype(np.float64)
        bad_values = np.zeros(table.num_rows, dtype=bool)
        bad_values[np.repeat(np.arange(table.num_rows), n_scores)[~np.isfinite(values)]] = True
        problems += [
            (n_scores != n_ids - prompt_len, f"has len({side}_scores) != len({side}_input_ids) - prompt_len"),
            (n_scores < 1, f"has an empty {side} response"),
            (bad_values, f"has NaN or infinite {side}_scores"),
            (
                n_ids > max_length,
                f"has {side} ids longer than --data.max_len {max_length} (scored with max_len "
                f"{manifest['data']['max_len']}): raise --data.max_len or re-score with a smaller one",
            ),
        ]
        scores[side] = values, n_scores
    for bad, what in problems:
        if bad.any():
            raise ScoreDataError(f"{score_dir!r}: {int(bad.sum())} row(s) {what}: {_first_rows(bad, indices)}")
    return prompt_len, scores


class ScoresPart(NamedTuple):
    """One scores dir as ``load`` read it: its first ``max_samples`` rows, validated."""

    score_dir: str
    table: object  # pyarrow.Table of the rows
    prompt_len: np.ndarray  # [rows] int64
    scores: dict  # side -> (flat float64 scores, scores per row)


class Scores(NamedTuple):
    """What ``load`` returns: the first ``total`` rows of all dirs, in order, and each dir as read."""

    data: object  # datasets.Dataset of the ``keep`` columns
    prompt_lens: np.ndarray  # [total] int64
    scores: dict  # side -> (flat float64 scores of the total rows, [total] scores per row)
    parts: list  # ScoresPart per dir


def load(dataset: str, tokenizer, max_length: int, sides=SIDES, max_samples: int = 100000000, keep=None,
         log=print, describe="{n} pairs from {score_dir}") -> Scores:
    """The loader: one or more scores dirs, comma-separated (OpenRLHF's ``--data.dataset`` syntax), read for
    training with ``tokenizer`` (``open_scores``), ``sides`` validated (``check_rows``), at most ``max_samples`` rows
    per dir and in total. ``keep``: the columns of ``Scores.data`` (default all); ``describe`` is logged per dir."""
    import datasets as hf_datasets

    columns = ("prompt_len", *(f"{s}_input_ids" for s in sides), *(f"{s}_scores" for s in sides))
    parts, rows = [], []
    for score_dir in [d.strip() for d in dataset.split(",") if d.strip()]:
        manifest, part = open_scores(score_dir, tokenizer, columns, max_samples)
        table = part.with_format("arrow")[:]
        parts.append(ScoresPart(score_dir, table, *check_rows(score_dir, manifest, table, sides, max_length)))
        rows.append(part if keep is None else part.select_columns(list(keep)))
        log(describe.format(n=len(part), score_dir=score_dir))
    if not parts:
        raise ScoreDataError(f"no scores dir given (dataset={dataset!r})")
    total = min(max_samples, sum(len(p) for p in rows))
    scores = {}
    for side in sides:
        lengths = np.concatenate([p.scores[side][1] for p in parts])[:total]
        scores[side] = np.concatenate([p.scores[side][0] for p in parts])[: lengths.sum()], lengths
    prompt_lens = np.concatenate([p.prompt_len for p in parts])[:total]
    return Scores(hf_datasets.concatenate_datasets(rows).select(range(total)), prompt_lens, scores, parts)


class Chunk(NamedTuple):
    """A block of rows of flat per-token values, right-padded: ``padded[at] == values[tokens]``."""

    rows: slice  # the block's rows
    tokens: slice  # their values in the flat layout
    at: tuple  # (row in block, position in row) of each of those values
    padded: torch.Tensor  # [rows, width of its longest row], 0 where a row has no value


def padded_chunks(values: torch.Tensor, lengths: torch.Tensor, rows_per_chunk: int = ROWS_PER_CHUNK):
    """Flat per-token ``values`` of rows of ``lengths`` (each >= 1) -> ``Chunk``s of ``rows_per_chunk`` rows: row
    operations (top-k, reversed cumsum, max, sum) on [n, W] blocks, never on the whole data set at once."""
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(len(values)) - starts[rows]
    for first in range(0, len(lengths), rows_per_chunk):
        last = min(first + rows_per_chunk, len(lengths))
        lo, hi = int(starts[first]), int(starts[last - 1] + lengths[last - 1])
        at = (rows[lo:hi] - first, positions[lo:hi])
        padded = torch.zeros(last - first, int(lengths[first:last].max()), dtype=values.dtype)
        padded[at] = values[lo:hi]
        yield Chunk(slice(first, last), slice(lo, hi), at, padded)
