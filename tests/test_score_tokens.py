"""End-to-end tests of ``python -m openrlhf_sepo.cli.score_tokens``: output schema and exactness, bad rows,
errors at start, resume after a SIGKILL, 2 ranks == 1 rank, the launcher script, the report."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import tiny
from openrlhf_sepo.cli import score_tokens
from openrlhf_sepo.rows import DataStrategy
from openrlhf_sepo.scoring import tokenizer_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_GOOD = 21
# Bad rows inserted at these positions of the data file, with the reason each must be skipped for.
BAD_ROWS = {3: "missing_key", 7: "non_text", 10: "empty_response", 15: "prompt_too_long", 20: "identical_responses"}


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """Oracle (seed 1) and ref (base) sharing the tiny tokenizer; UltraFeedback-shape pairs with bad rows mixed in."""
    root = tmp_path_factory.mktemp("scoring")
    oracle = str(root / "oracle")
    tiny.build_model(oracle, os.path.join(tiny_dir, "tokenizer"), seed=1)
    good = [json.loads(line) for line in open(tiny.write_preference_data(str(root / "good.jsonl"), N_GOOD, seed=3))]
    rows, user = [], {"role": "user", "content": "Write a short note about the river."}
    bad = {
        "missing_key": {"prompt": "p", "chosen": [user, {"role": "assistant", "content": "The river is clear."}]},
        "non_text": {"prompt": "p", "chosen": [user, {"role": "assistant", "content": "The river is clear."}],
                     "rejected": [user, {"role": "assistant", "content": None}]},
        "empty_response": {"prompt": "p", "chosen": [user, {"role": "assistant", "content": "   "}],
                           "rejected": [user, {"role": "assistant", "content": "The river is wrong."}]},
        "prompt_too_long": {"prompt": "p", "chosen": [{"role": "user", "content": "the river " * 80},
                                                      {"role": "assistant", "content": "Clear."}],
                            "rejected": [{"role": "user", "content": "the river " * 80},
                                         {"role": "assistant", "content": "Wrong."}]},
        "identical_responses": {"prompt": "p", "chosen": [user, {"role": "assistant", "content": "The same."}],
                                "rejected": [user, {"role": "assistant", "content": "The same."}]},
    }
    good_iter = iter(good)
    for i in range(N_GOOD + len(BAD_ROWS)):
        rows.append(bad[BAD_ROWS[i]] if i in BAD_ROWS else next(good_iter))
    data = str(root / "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"root": root, "oracle": oracle, "ref": os.path.join(tiny_dir, "base"), "data": data, "rows": rows,
            "tokenizer": os.path.join(tiny_dir, "tokenizer")}


def flags(setup, out, *extra):
    return ["--oracle.model_name_or_path", setup["oracle"], "--ref.model_name_or_path", setup["ref"],
            "--data.dataset", setup["data"], "--data.apply_chat_template", "--data.max_len", "96",
            "--score.micro_batch_size", "4", "--score.shard_size", "8", "--output_dir", str(out), *extra]


def run_direct(args, env=None):
    """``python -m openrlhf_sepo.cli.score_tokens ARGS``: one process, no CPU wrapper, no launcher variables."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "openrlhf_sepo.cli.score_tokens", *args], cwd=REPO, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def load_scores(out):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_dir=os.path.join(str(out), "data"), split="train")
    return sorted(ds, key=lambda r: r["index"])


def manifest(out):
    with open(os.path.join(str(out), "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference_run(setup):
    """One uninterrupted single-process run (published alias flags), the baseline the other runs must equal."""
    out = setup["root"] / "one_rank"
    args = flags(setup, out)
    args[args.index("--oracle.model_name_or_path")] = "--dpo_model_path"
    args[args.index("--ref.model_name_or_path")] = "--ref_model_path"
    args[args.index("--output_dir")] = "--save_dir"
    proc = run_direct(args)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return out, proc.stdout


@pytest.mark.slow
def test_output_schema_ids_scores_and_manifest(setup, reference_run):
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, stdout = reference_run
    rows = load_scores(out)
    kept = [i for i in range(len(setup["rows"])) if i not in BAD_ROWS]
    assert [r["index"] for r in rows] == kept
    assert set(rows[0]) >= {"index", "prompt_len", "chosen_input_ids", "rejected_input_ids", "chosen_scores",
                            "rejected_scores"}

    # Ids: exactly what OpenRLHF's RewardDataset(is_dpo=True) gives the trainer for the kept rows.
    tok = AutoTokenizer.from_pretrained(setup["oracle"])
    args = score_tokens.parse_args(flags(setup, out))
    strategy = DataStrategy(args.data)
    ds = RewardDataset(Dataset.from_list([setup["rows"][i] for i in kept]), tok, 96, strategy, is_dpo=True,
                       num_processors=1)
    assert len(ds) == len(rows)
    for r, (c_ids, _, r_ids, _, prompt_len) in zip(rows, (ds[i] for i in range(len(ds)))):
        assert r["chosen_input_ids"] == c_ids[0].tolist() and r["rejected_input_ids"] == r_ids[0].tolist()
        assert r["prompt_len"] == prompt_len

    # Scores: an independent per-example fp32 computation, every response token (first and EOS included).
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    oracle, ref = load(setup["oracle"]), load(setup["ref"])
    for r in rows:
        for side in ("chosen", "rejected"):
            ids, p = r[f"{side}_input_ids"], r["prompt_len"]
            with torch.no_grad():
                x = torch.tensor([ids])
                lo, lr = torch.log_softmax(oracle(x).logits[0], -1), torch.log_softmax(ref(x).logits[0], -1)
            expected = torch.stack([lo[t - 1, ids[t]] - lr[t - 1, ids[t]] for t in range(p, len(ids))])
            assert len(r[f"{side}_scores"]) == len(ids) - p
            torch.testing.assert_close(torch.tensor(r[f"{side}_scores"]), expected, atol=1e-5, rtol=0)

    m = manifest(out)
    assert m["complete"] is True
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert m["data"]["max_len"] == 96 and m["data"]["apply_chat_template"] is True
    assert m["oracle"]["name_or_path"] == setup["oracle"] and m["oracle"]["config"]["model_type"] == "llama"
    assert m["oracle"]["weights_fingerprint"] != m["ref"]["weights_fingerprint"]
    counts = m["counts"]
    assert (counts["pairs_read"], counts["pairs_kept"], counts["pairs_skipped"]) == (len(setup["rows"]), N_GOOD, 5)
    for index, reason in BAD_ROWS.items():
        assert counts["skipped_by_reason"][reason] == 1
        assert counts["skipped_examples"][reason][0]["index"] == index
        assert f"{reason} (e.g. row {index}" in stdout  # reported, naming the row
    n_tokens = sum(len(r["chosen_scores"]) for r in rows)
    assert m["score_stats"]["chosen"]["tokens"] == n_tokens
    assert set(m["selection"]) == {"0.1", "0.3", "0.5"}
    sel = m["selection"]["0.3"]["chosen"]
    assert sel["tokens_selected"] == sum(max(1, int(0.3 * len(r["chosen_scores"]) + 1e-9)) for r in rows)
    # The chosen side keeps the highest scores, the rejected side the lowest.
    assert sel["mean_selected_score"] > m["score_stats"]["chosen"]["mean"]
    assert m["selection"]["0.3"]["rejected"]["mean_selected_score"] < m["score_stats"]["rejected"]["mean"]
    n_rejected = sum(len(r["rejected_scores"]) for r in rows)
    assert m["score_stats"]["rejected"]["tokens"] == n_rejected
    assert m["timing"]["tokens_scored_this_run"] == n_tokens + n_rejected and m["timing"]["tokens_per_s"] > 0
    assert m["shards"] == {"total": 4, "scored_this_run": 4, "resumed": 0}


def _assert_same_scores(rows_a, rows_b, atol=0.0):
    assert [r["index"] for r in rows_a] == [r["index"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for key in ("prompt_len", "chosen_input_ids", "rejected_input_ids"):
            assert a[key] == b[key]
        for key in ("chosen_scores", "rejected_scores"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=atol, rtol=0)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(setup, reference_run):
    out = setup["root"] / "killed"
    killed = run_direct(flags(setup, out), env={score_tokens.KILL_AFTER_SHARDS_ENV: "2"})
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert manifest(out)["complete"] is False
    done = sorted(glob.glob(os.path.join(str(out), "shards", "shard-*.json")))
    assert [os.path.basename(p) for p in done] == ["shard-00000.json", "shard-00001.json"]
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(str(out), "data", "*.parquet"))}
    assert len(mtimes) == 2

    resumed = run_direct(flags(setup, out))
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert "resuming: 2 of my 4 shards already done" in resumed.stdout
    assert all(os.stat(p).st_mtime_ns == t for p, t in mtimes.items())  # finished shards kept, not recomputed
    m = manifest(out)
    assert m["complete"] is True and m["shards"] == {"total": 4, "scored_this_run": 2, "resumed": 2}
    assert m["counts"] == manifest(reference_run[0])["counts"]
    _assert_same_scores(load_scores(out), load_scores(reference_run[0]))


def test_errors_at_start(setup, tiny_dir, tmp_path):
    # Oracle with another tokenizer (different vocabulary).
    other_tok = str(tmp_path / "other_tok")
    tiny.build_tokenizer(other_tok, vocab_size=300)
    other = str(tmp_path / "other_model")
    tiny.build_model(other, other_tok)
    args = flags(setup, tmp_path / "out")
    args[args.index(setup["oracle"])] = other
    with pytest.raises(SystemExit, match="tokenizers differ"):
        score_tokens.main(args)
    # Same tokenizer, padded embedding: vocabularies differ.
    padded = str(tmp_path / "padded_model")
    tiny.build_model(padded, setup["tokenizer"], vocab_size=1024)
    args[args.index(other)] = padded
    with pytest.raises(SystemExit, match="vocabularies differ"):
        score_tokens.main(args)
    assert not os.path.exists(tmp_path / "out")  # nothing written before the check
    # Bad flags.
    with pytest.raises(SystemExit, match="k_perc"):
        score_tokens.main(flags(setup, tmp_path / "out", "--k_perc", "0.3,1.5"))
    with pytest.raises(SystemExit, match="input_template"):
        score_tokens.main(flags(setup, tmp_path / "out", "--data.input_template", "no placeholder"))


def test_output_dir_of_another_run_needs_overwrite(setup, tmp_path):
    out = tmp_path / "out"
    first = score_tokens.main(flags(setup, out, "--data.max_samples", "6"))
    assert first["counts"]["pairs_read"] == 6
    with pytest.raises(SystemExit, match="holds another run"):
        score_tokens.main(flags(setup, out, "--data.max_samples", "9"))
    again = score_tokens.main(flags(setup, out, "--data.max_samples", "6"))  # same run: nothing to redo
    assert again["shards"] == {"total": 1, "scored_this_run": 0, "resumed": 1}
    replaced = score_tokens.main(flags(setup, out, "--data.max_samples", "9", "--overwrite"))
    assert replaced["counts"]["pairs_read"] == 9 and replaced["shards"]["scored_this_run"] == 2
    assert len(load_scores(out)) == 9 - sum(1 for i in BAD_ROWS if i < 9)


def test_dirs_from_before_the_format_version_resume_and_newer_ones_are_refused(setup, tmp_path):
    """A killed run's dir whose manifest has no format fields (written before they existed) resumes as the same
    run; a dir of a newer format version is refused, naming the dir, unless --overwrite."""
    out = tmp_path / "out"
    first = score_tokens.main(flags(setup, out, "--data.max_samples", "9"))
    assert (first["format"], first["format_version"], first["shards"]["total"]) == ("openrlhf-sepo token scores", 1, 2)
    old = {k: v for k, v in first.items() if k not in ("format", "format_version")}
    with open(os.path.join(str(out), "manifest.json"), "w") as f:
        json.dump({**old, "complete": False}, f)
    os.remove(os.path.join(str(out), "shards", "shard-00001.json"))  # as if killed before shard 1 was done
    resumed = score_tokens.main(flags(setup, out, "--data.max_samples", "9"))
    assert resumed["shards"] == {"total": 2, "scored_this_run": 1, "resumed": 1}
    assert resumed["counts"] == first["counts"] and resumed["format_version"] == 1

    with open(os.path.join(str(out), "manifest.json"), "w") as f:
        json.dump({**resumed, "format_version": 2}, f)
    refused = f"scores dir {re.escape(repr(str(out)))} is in format .* version 2, but this openrlhf-sepo reads .* version 1"
    with pytest.raises(SystemExit, match=refused + ".*pass --overwrite"):
        score_tokens.main(flags(setup, out, "--data.max_samples", "9"))
    replaced = score_tokens.main(flags(setup, out, "--data.max_samples", "9", "--overwrite"))
    assert replaced["format_version"] == 1 and replaced["shards"]["scored_this_run"] == 2


def test_all_rows_bad_is_an_error(setup, tmp_path):
    with pytest.raises(SystemExit, match="no pair was kept"):  # no prompt key, no chat template: every prompt empty
        score_tokens.main(["--oracle.model_name_or_path", setup["oracle"], "--ref.model_name_or_path", setup["ref"],
                           "--data.dataset", tiny.write_preference_data(str(tmp_path / "plain.jsonl"), 4, shape="plain"),
                           "--output_dir", str(tmp_path / "out")])
    assert manifest(tmp_path / "out")["counts"]["skipped_by_reason"]["empty_prompt"] == 4


@pytest.mark.slow
def test_two_ranks_equal_one_rank(setup, reference_run, run):
    out = setup["root"] / "two_ranks"
    run("openrlhf_sepo.cli.score_tokens", flags(setup, out, "--ds.attn_implementation", "sdpa"), nproc=2)
    m = manifest(out)
    assert m["complete"] is True and m["timing"]["world_size"] == 2
    records = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(str(out), "shards", "*.json")))]
    assert [r["rank"] for r in records] == [0, 1, 0, 1]  # shard s on rank s % 2
    assert m["counts"] == manifest(reference_run[0])["counts"]
    _assert_same_scores(load_scores(out), load_scores(reference_run[0]), atol=1e-5)


@pytest.mark.slow
def test_launcher_script_on_cpu(setup, tmp_path):
    out = tmp_path / "launched"
    env = {**os.environ, "SEPO_DEVICE": "cpu", "SEPO_NPROC": "1", "PYTHON": sys.executable}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    # Defaults name TinyLlama checkpoints and the hub data set; the arguments given here override them.
    proc = subprocess.run(["bash", "examples/scripts/score_tokens_llama.sh", *flags(setup, out, "--ds.param_dtype", "fp32", "--data.dataset_split", "train")],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    m = manifest(out)
    assert m["complete"] is True and m["score"]["attn_implementation"] == "sdpa" and m["counts"]["pairs_kept"] == N_GOOD


@pytest.mark.slow
def test_report_html_and_histograms(setup, reference_run, tmp_path):
    from openrlhf_sepo.cli import score_report

    out, _ = reference_run
    path = score_report.main([str(out), "--out", str(tmp_path / "report"), "--k", "0.3", "--num_pairs", "5"])
    page = open(path, encoding="utf-8").read()
    assert page.count('class="pair"') == 5 and 'src="scores.png"' in page
    rows = load_scores(out)
    shown = [r for r in rows if f"pair {r['index']} <small>" in page]
    assert len(shown) == 5
    # Every response token of a shown pair is a shaded span; the selected ones at k = 0.3 are marked.
    n_tokens = sum(len(r["chosen_scores"]) + len(r["rejected_scores"]) for r in shown)
    assert page.count('<span class="tok') == n_tokens + 2  # + the two legend samples
    n_marked = sum(max(1, int(0.3 * len(r[f"{s}_scores"]) + 1e-9)) for r in shown for s in ("chosen", "rejected"))
    assert page.count('class="tok sel-') == n_marked + 2
    png = tmp_path / "report" / "scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="not a score_tokens output dir"):
        score_report.main([str(tmp_path)])
