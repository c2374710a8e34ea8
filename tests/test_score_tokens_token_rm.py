"""``score_tokens --scorer token_rm``: a learned token reward model (token_rm.py) as SePO's scorer. Same scores-dir
format as the oracle/ref scorer: exact per-token rewards through the CPU runtime with 1 and 2 ranks, the dir loads
in TokenScoreDataset in every selection mode, the manifest names the scorer, bad flags fail before any weights load."""

import glob
import json
import os
import shlex
import subprocess

import pytest
import torch
import torch.nn.functional as F

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import score_tokens as engine
from openrlhf_sepo.cli import score_tokens
from openrlhf_sepo.scoring import tokenizer_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"activation": "softplus", "aggregation": "avg", "tau": 2.0}


@pytest.fixture(scope="module")
def token_rm_dir(tiny_dir, tmp_path_factory):
    """A train_token_rm-shaped checkpoint: OpenRLHF's critic model on tiny_dir's base, its head under "score", the
    training settings in config.token_rm, the tiny tokenizer beside it. The head (N(0, 1/(H+1)) from
    init_value_head) is scaled up so that rewards spread over the activation's range instead of sitting at r(0)."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    out = str(tmp_path_factory.mktemp("token_rm") / "token_rm")
    model = get_llm_for_sequence_regression(os.path.join(tiny_dir, "base"), "critic", init_value_head=True,
                                            param_dtype="bf16", attn_implementation="sdpa")
    with torch.no_grad():
        model.score.weight.mul_(20.0)
    model.config.value_head_prefix = "score"  # OpenRLHF's loader reads the head's name from the config
    model.config.token_rm = dict(SETTINGS)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer")).save_pretrained(out)
    return out


def flags(tiny_dir, token_rm_dir, out, *extra):
    return ["--scorer", "token_rm", "--token_rm.model_name_or_path", token_rm_dir,
            "--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"), "--data.apply_chat_template",
            "--data.max_len", "128", "--ds.attn_implementation", "sdpa",
            "--score.micro_batch_size", "4", "--score.shard_size", "16", "--output_dir", str(out), *extra]


def load_scores(out):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_dir=os.path.join(str(out), "data"), split="train")
    return sorted(ds, key=lambda r: r["index"])


def manifest(out):
    with open(os.path.join(str(out), "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_rank(tiny_dir, token_rm_dir, tmp_path_factory, run):
    out = tmp_path_factory.mktemp("rm_scores") / "one_rank"
    run("openrlhf_sepo.cli.score_tokens", flags(tiny_dir, token_rm_dir, out), nproc=1)
    return out


def expected_rewards(token_rm_dir, ids, prompt_len):
    """The learned reward of every response token, computed alone: one unpadded sequence, fp32, the backbone's last
    hidden state at each position through the head and the softplus activation (no token_rewards, no batching)."""
    from openrlhf_sepo.token_rm import load_token_rm

    if token_rm_dir not in expected_rewards.models:
        expected_rewards.models[token_rm_dir] = load_token_rm(token_rm_dir, "fp32", "sdpa")[0].eval()
    model = expected_rewards.models[token_rm_dir]
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0]
        z = model.score(hidden)[:, 0]
    return F.softplus(1.0 - F.softplus(1.0 - z))[prompt_len:]


expected_rewards.models = {}


@pytest.mark.slow
def test_scores_ids_and_manifest(tiny_dir, token_rm_dir, tiny_pairs, one_rank):
    rows = load_scores(one_rank)
    # Ids: exactly what OpenRLHF's RewardDataset(is_dpo=True) makes of pairs.jsonl with the token RM's tokenizer.
    tokenizer, pairs = tiny_pairs
    assert [(r["prompt_len"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in rows] == pairs
    for r in rows:
        for side in ("chosen", "rejected"):
            ids, p = r[f"{side}_input_ids"], r["prompt_len"]
            assert len(r[f"{side}_scores"]) == len(ids) - p  # first response token and EOS included
            torch.testing.assert_close(torch.tensor(r[f"{side}_scores"]), expected_rewards(token_rm_dir, ids, p),
                                       atol=1e-5, rtol=0)
    spread = torch.tensor([s for r in rows for s in r["chosen_scores"]])
    assert spread.std() > 0.05  # the comparison above is not between constants
    ids, p = rows[0]["chosen_input_ids"], rows[0]["prompt_len"]  # ... and sees a shift by one position
    shifted = torch.cat([expected_rewards(token_rm_dir, ids, p - 1)[:1], expected_rewards(token_rm_dir, ids, p)[:-1]])
    assert (torch.tensor(rows[0]["chosen_scores"]) - shifted).abs().max() > 1e-2

    m = manifest(one_rank)
    assert m["complete"] is True and m["scorer"] == "token_rm"
    assert "softplus" in m["formula"] and "oracle" not in m and "ref" not in m
    assert m["token_rm"]["name_or_path"] == token_rm_dir and m["token_rm"]["settings"] == SETTINGS
    assert m["token_rm"]["config"]["token_rm"] == SETTINGS and len(m["token_rm"]["weights_fingerprint"]) == 16
    assert m["tokenizer"] == {"name_or_path": token_rm_dir, "fingerprint": tokenizer_fingerprint(tokenizer)}
    assert m["counts"]["pairs_kept"] == len(rows) and m["timing"]["world_size"] == 1
    n_tokens = sum(len(r["chosen_scores"]) + len(r["rejected_scores"]) for r in rows)
    assert m["timing"]["tokens_scored_this_run"] == n_tokens


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tiny_dir, token_rm_dir, one_rank, run):
    out = one_rank.parent / "two_ranks"
    run("openrlhf_sepo.cli.score_tokens", flags(tiny_dir, token_rm_dir, out), nproc=2)
    m = manifest(out)
    assert m["complete"] is True and m["timing"]["world_size"] == 2 and m["run_id"] == manifest(one_rank)["run_id"]
    assert m["counts"] == manifest(one_rank)["counts"]
    records = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(str(out), "shards", "*.json")))]
    assert [r["rank"] for r in records] == [0, 1, 0]  # 3 shards of 16 pairs: shard s on rank s % 2
    a, b = load_scores(one_rank), load_scores(out)
    assert [r["index"] for r in a] == [r["index"] for r in b]
    for x, y in zip(a, b):
        assert (x["prompt_len"], x["chosen_input_ids"], x["rejected_input_ids"]) == \
               (y["prompt_len"], y["chosen_input_ids"], y["rejected_input_ids"])
        for key in ("chosen_scores", "rejected_scores"):
            torch.testing.assert_close(torch.tensor(x[key]), torch.tensor(y[key]), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["per_response", "global", "random"])
def test_token_score_dataset_reads_it(tiny_pairs, one_rank, selection):
    from openrlhf_sepo.datasets import TokenScoreDataset

    tokenizer, pairs = tiny_pairs
    ds = TokenScoreDataset(str(one_rank), tokenizer, 128, k_chosen=0.3, k_rejected=0.3, selection=selection)
    assert len(ds) == len(pairs)
    for i in range(len(ds)):
        chosen_ids, _, rejected_ids, _, prompt_len, chosen_mask, rejected_mask = ds[i]
        for ids, mask in ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)):
            assert mask.shape == (1, ids.shape[1] - 1) and mask.any()
            assert not mask[0, : prompt_len - 1].any()  # log-prob layout: column t is token t + 1; no prompt token


@pytest.mark.slow
def test_rescoring_with_another_scorer_needs_overwrite(tiny_dir, token_rm_dir, one_rank, tmp_path):
    oracle_ref = ["--oracle.model_name_or_path", os.path.join(tiny_dir, "base"),
                  "--ref.model_name_or_path", os.path.join(tiny_dir, "base"),
                  "--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"), "--data.apply_chat_template",
                  "--data.max_len", "128", "--score.shard_size", "16", "--output_dir", str(one_rank)]
    with pytest.raises(SystemExit, match="holds another run"):
        score_tokens.main(oracle_ref)
    assert manifest(one_rank)["scorer"] == "token_rm"  # untouched
    # The same token RM run into the same dir: resumed, nothing redone (in process, 8 rows).
    out = tmp_path / "small"
    first = score_tokens.main(flags(tiny_dir, token_rm_dir, out, "--data.max_samples", "8"))
    again = score_tokens.main(flags(tiny_dir, token_rm_dir, out, "--data.max_samples", "8"))
    assert again["run_id"] == first["run_id"] and again["shards"] == {"total": 1, "scored_this_run": 0, "resumed": 1}
    with pytest.raises(SystemExit, match="holds another run"):
        score_tokens.main(oracle_ref[:-1] + [str(out), "--data.max_samples", "8"])
    replaced = score_tokens.main(oracle_ref[:-1] + [str(out), "--data.max_samples", "8", "--overwrite"])
    assert replaced["scorer"] == "oracle_ref" and "token_rm" not in replaced and replaced["oracle"]


def test_bad_flags_fail_before_any_weights_load(tiny_dir, token_rm_dir, tmp_path, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded before the flags were checked")

    monkeypatch.setattr(engine, "load_token_rm", no_weights)
    monkeypatch.setattr(engine, "load_model", no_weights)
    out = tmp_path / "out"
    data = ["--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"), "--output_dir", str(out)]
    base = os.path.join(tiny_dir, "base")
    parser_errors = [
        (["--scorer", "token_rm", *data], "--token_rm.model_name_or_path is required with --scorer token_rm"),
        (["--scorer", "token_rm", "--token_rm.model_name_or_path", token_rm_dir, "--oracle.model_name_or_path", base,
          *data], "--oracle.model_name_or_path (alias --dpo_model_path) is not used with --scorer token_rm"),
        (["--scorer", "token_rm", "--token_rm.model_name_or_path", token_rm_dir, "--ref_model_path", base, *data],
         "--ref.model_name_or_path (alias --ref_model_path) is not used with --scorer token_rm"),
        (["--token_rm.model_name_or_path", token_rm_dir, *data], "add --scorer token_rm"),
        (["--ref.model_name_or_path", base, *data], "--oracle.model_name_or_path (alias --dpo_model_path) is required"),
        (["--dpo_model_path", base, *data], "--ref.model_name_or_path (alias --ref_model_path) is required"),
    ]
    for argv, message in parser_errors:
        with pytest.raises(SystemExit) as e:
            score_tokens.main(argv)
        assert e.value.code == 2, argv  # argparse's usage error
        assert message in capsys.readouterr().err, argv
    # A plain causal LM (no token_rm entry in its config) given as the token RM.
    with pytest.raises(SystemExit, match=r"--token_rm.model_name_or_path .* is not a train_token_rm checkpoint"):
        score_tokens.main(["--scorer", "token_rm", "--token_rm.model_name_or_path", base, *data])
    with pytest.raises(SystemExit, match=r"--token_rm.model_name_or_path: cannot read a model config"):
        score_tokens.main(["--scorer", "token_rm", "--token_rm.model_name_or_path", str(tmp_path / "nope"), *data])
    assert not os.path.exists(out)  # nothing written before the checks


@pytest.mark.slow
def test_launcher_takes_the_token_rm_scorer():
    """The launcher's defaults name the oracle and the reference; --scorer token_rm on its command line replaces
    them (and the output dir) with the token RM's, so score_tokens accepts the command it runs."""
    def launched(*args):
        env = {**os.environ, "SEPO_DRY_RUN": "1"}
        env.pop("SEPO_DEVICE", None)
        proc = subprocess.run(["bash", "examples/scripts/score_tokens_llama.sh", *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60, check=True)
        words = shlex.split(proc.stdout)
        return score_tokens.parse_args(words[words.index("openrlhf_sepo.cli.score_tokens") + 1 :])

    args = launched("--scorer", "token_rm", "--token_rm.model_name_or_path", "/ckpt/token_rm")
    assert (args.scorer, args.token_rm.model_name_or_path, args.oracle.model_name_or_path) == ("token_rm", "/ckpt/token_rm", None)
    assert args.output_dir == "./checkpoint/tinyllama-token-rm-scores"
    assert launched("--scorer=token_rm").token_rm.model_name_or_path == "./checkpoint/tinyllama-token-rm"
    args = launched("--data.max_len", "64")
    assert args.scorer == "oracle_ref" and args.oracle.model_name_or_path == "./checkpoint/tinyllama-dpo-oracle"
    assert args.output_dir == "./checkpoint/tinyllama-token-scores" and args.data.max_len == 64
