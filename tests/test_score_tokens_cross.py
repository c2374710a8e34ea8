"""``score_tokens --policy.tokenizer``: an oracle / reference on one tokenizer (BPE vocab 300) scoring for a policy on
another (vocab 512). The ids written are the policy's RewardDataset(is_dpo=True) ids, each response's mapped scores
sum to its oracle-token scores (an independent per-example forward), the dir loads in TokenScoreDataset with the
policy's tokenizer only, truncated rows are counted as mapping_failed, bad set-ups fail at start; slow: 2 ranks
equal 1, and train_sepo trains the vocab-512 policy on the mapped scores."""

import glob
import json
import os

import pytest
import torch

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import tiny
from openrlhf_sepo import score_tokens as engine
from openrlhf_sepo.cli import score_tokens
from openrlhf_sepo.rows import DataStrategy
from openrlhf_sepo.scoring import tokenizer_fingerprint

N_GOOD = 32
LONG_ROW = 5  # a response longer than max_len: truncated on both sides -> mapping_failed
MAX_LEN = 128


@pytest.fixture(scope="module")
def assets(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    tok300 = str(root / "tok300")
    tiny.build_tokenizer(tok300, 300)
    oracle, ref = str(root / "oracle"), str(root / "ref")
    tiny.build_model(oracle, tok300, seed=1)
    tiny.build_model(ref, tok300, seed=2)
    rows = [json.loads(line) for line in open(tiny.write_preference_data(str(root / "good.jsonl"), N_GOOD, seed=3))]
    user = {"role": "user", "content": "Write a short note about the river."}
    rows.insert(LONG_ROW, {"prompt": "p", "chosen": [user, {"role": "assistant", "content": "the river is calm " * 40}],
                           "rejected": [user, {"role": "assistant", "content": "The river is wrong."}]})
    data = str(root / "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # The policy: tiny_dir's vocab-512 base model; --policy.tokenizer takes its model dir.
    return {"root": root, "oracle": oracle, "ref": ref, "tok300": tok300, "policy": os.path.join(tiny_dir, "base"),
            "data": data, "rows": rows}


def flags(assets, out, *extra, policy=None):
    return ["--oracle.model_name_or_path", assets["oracle"], "--ref.model_name_or_path", assets["ref"],
            "--policy.tokenizer", policy or assets["policy"], "--data.dataset", assets["data"],
            "--data.apply_chat_template", "--data.max_len", str(MAX_LEN), "--ds.attn_implementation", "sdpa",
            "--score.micro_batch_size", "4", "--score.shard_size", "16", "--output_dir", str(out), *extra]


def load_scores(out):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_dir=os.path.join(str(out), "data"), split="train")
    return sorted(ds, key=lambda r: r["index"])


def manifest(out):
    with open(os.path.join(str(out), "manifest.json")) as f:
        return json.load(f)


def reward_dataset(assets, tokenizer_dir, indices):
    """[(prompt_len, chosen_ids, rejected_ids)] as OpenRLHF's RewardDataset(is_dpo=True) makes them."""
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset
    from openrlhf.utils import get_tokenizer

    tok = get_tokenizer(tokenizer_dir, None, "right", None)
    args = score_tokens.parse_args(flags(assets, "unused"))
    ds = RewardDataset(Dataset.from_list([assets["rows"][i] for i in indices]), tok, MAX_LEN,
                       DataStrategy(args.data, quiet=True), is_dpo=True, num_processors=1)
    return tok, [(p, c[0].tolist(), r[0].tolist()) for c, _, r, _, p in (ds[i] for i in range(len(ds)))]


@pytest.fixture(scope="module")
def one_rank(assets, run):
    out = assets["root"] / "one_rank"
    run("openrlhf_sepo.cli.score_tokens", flags(assets, out), nproc=1)
    return out


@pytest.mark.slow
def test_policy_ids_mapped_sums_and_manifest(assets, one_rank):
    from transformers import AutoModelForCausalLM

    rows = load_scores(one_rank)
    kept = [i for i in range(len(assets["rows"])) if i != LONG_ROW]
    assert [r["index"] for r in rows] == kept
    # (a) The ids are the policy's, exactly as RewardDataset(is_dpo=True) makes them with its tokenizer.
    policy_tok, policy = reward_dataset(assets, assets["policy"], kept)
    assert [(r["prompt_len"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in rows] == policy
    # (b) Per response, the mapped scores sum to the oracle-token scores, computed alone (plain forward of the
    # oracle and the reference on the oracle's own RewardDataset tokenization, fp32, one example at a time).
    oracle_tok, oracle_side = reward_dataset(assets, assets["tok300"], kept)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    oracle, ref = load(assets["oracle"]), load(assets["ref"])
    differs = 0
    for r, (op, oc, orj) in zip(rows, oracle_side):
        for side, ids in (("chosen", oc), ("rejected", orj)):
            with torch.no_grad():
                x = torch.tensor([ids])
                lo, lr = torch.log_softmax(oracle(x).logits[0], -1), torch.log_softmax(ref(x).logits[0], -1)
            expected = torch.stack([lo[t - 1, ids[t]] - lr[t - 1, ids[t]] for t in range(op, len(ids))])
            mapped = torch.tensor(r[f"{side}_scores"])
            assert len(mapped) == len(r[f"{side}_input_ids"]) - r["prompt_len"]  # one per policy response token
            assert mapped.double().sum().item() == pytest.approx(expected.double().sum().item(), abs=1e-4)
            assert mapped[-1].item() == pytest.approx(expected[-1].item(), abs=1e-5)  # final EOS -> final EOS
            differs += len(mapped) != len(expected)
    assert differs > len(rows)  # the two tokenizations really differ on most responses

    m = manifest(one_rank)
    assert m["complete"] is True
    assert m["tokenizer"] == {"name_or_path": assets["policy"], "fingerprint": tokenizer_fingerprint(policy_tok)}
    assert m["oracle_tokenizer"] == {"name_or_path": assets["oracle"], "fingerprint": tokenizer_fingerprint(oracle_tok)}
    assert m["tokenizer"]["fingerprint"] != m["oracle_tokenizer"]["fingerprint"]
    assert "character-overlap" in m["token_mapping"] and "sum preserved" in m["token_mapping"]
    counts = m["counts"]
    assert (counts["pairs_read"], counts["pairs_kept"]) == (N_GOOD + 1, N_GOOD)
    assert counts["skipped_by_reason"]["mapping_failed"] == 1
    example = counts["skipped_examples"]["mapping_failed"][0]
    assert example["index"] == LONG_ROW and "truncated at --data.max_len" in example["message"]
    n_tokens = sum(len(r["chosen_scores"]) for r in rows)
    assert m["score_stats"]["chosen"]["tokens"] == n_tokens  # statistics of the written (policy-token) scores


@pytest.mark.slow
def test_scores_load_with_the_policy_tokenizer_only(assets, one_rank):
    from openrlhf.utils import get_tokenizer

    from openrlhf_sepo.datasets import ScoreDataError, TokenScoreDataset

    ds = TokenScoreDataset(str(one_rank), get_tokenizer(assets["policy"], None, "right", None), MAX_LEN)
    assert len(ds) == N_GOOD
    chosen_ids, _, _, _, prompt_len, chosen_mask, _ = ds[0]
    assert chosen_mask.shape == (1, chosen_ids.shape[1] - 1) and chosen_mask.any()
    with pytest.raises(ScoreDataError, match="fingerprint"):
        TokenScoreDataset(str(one_rank), get_tokenizer(assets["oracle"], None, "right", None), MAX_LEN)


@pytest.mark.slow
def test_run_id_includes_the_policy_tokenizer(assets, one_rank):
    # Same flags, another policy tokenizer (the oracle's own): another run. Without the flag: another run too.
    with pytest.raises(SystemExit, match="holds another run"):
        score_tokens.main(flags(assets, one_rank, policy=assets["tok300"]))
    plain = flags(assets, one_rank)
    del plain[plain.index("--policy.tokenizer") : plain.index("--policy.tokenizer") + 2]
    with pytest.raises(SystemExit, match="holds another run"):
        score_tokens.main(plain)
    assert manifest(one_rank)["complete"] is True  # untouched


def test_errors_at_start(assets, tmp_path, capsys, monkeypatch):
    from transformers import ByT5Tokenizer

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded before the set-up was checked")

    monkeypatch.setattr(engine, "load_model", no_weights)
    out = tmp_path / "out"
    slow = str(tmp_path / "byt5")  # a tokenizer with no fast (Rust) version: no character offsets
    ByT5Tokenizer().save_pretrained(slow)
    with pytest.raises(SystemExit, match=r"--policy.tokenizer maps tokens by character offsets .* needs fast "
                                         r"tokenizers: the tokenizer of --policy.tokenizer .*byt5"):
        score_tokens.main(flags(assets, out, policy=slow))
    with pytest.raises(SystemExit, match="--policy.tokenizer: cannot load a tokenizer"):
        score_tokens.main(flags(assets, out, policy=str(tmp_path / "nope")))
    for extra, message in (([], "drop --data.disable_fast_tokenizer"), (["--scorer", "token_rm"], "oracle_ref only")):
        argv = flags(assets, out, "--data.disable_fast_tokenizer") if not extra else \
            ["--scorer", "token_rm", "--token_rm.model_name_or_path", assets["oracle"], "--policy.tokenizer",
             assets["policy"], "--data.dataset", assets["data"], "--output_dir", str(out)]
        with pytest.raises(SystemExit) as e:
            score_tokens.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    # Oracle and reference must still share a tokenizer with each other.
    argv = flags(assets, out)
    argv[argv.index(assets["ref"])] = assets["policy"]
    with pytest.raises(SystemExit, match="tokenizers differ"):
        score_tokens.main(argv)
    assert not os.path.exists(out)  # nothing written before the checks


@pytest.mark.slow
def test_two_ranks_equal_one_rank(assets, one_rank, run):
    out = assets["root"] / "two_ranks"
    run("openrlhf_sepo.cli.score_tokens", flags(assets, out), nproc=2)
    m = manifest(out)
    assert m["complete"] is True and m["timing"]["world_size"] == 2 and m["run_id"] == manifest(one_rank)["run_id"]
    assert m["counts"] == manifest(one_rank)["counts"]
    records = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(str(out), "shards", "*.json")))]
    assert [r["rank"] for r in records] == [0, 1, 0]
    for a, b in zip(load_scores(one_rank), load_scores(out), strict=True):
        assert (a["index"], a["prompt_len"], a["chosen_input_ids"], a["rejected_input_ids"]) == \
               (b["index"], b["prompt_len"], b["chosen_input_ids"], b["rejected_input_ids"])
        for key in ("chosen_scores", "rejected_scores"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_train_sepo_on_cross_tokenizer_scores(assets, one_rank, run, tb_scalars, tmp_path):
    tb = str(tmp_path / "tb")
    run("openrlhf_sepo.cli.train_sepo", [
        "--model.model_name_or_path", assets["policy"], "--data.dataset", str(one_rank),
        "--data.max_len", str(MAX_LEN), "--train.batch_size", "8", "--train.micro_batch_size", "4",
        "--adam.lr", "1e-3", "--ds.attn_implementation", "sdpa", "--ckpt.output_dir", str(tmp_path / "out"),
        "--logger.tensorboard_dir", tb,
    ], nproc=2)
    losses = tb_scalars(tb)["train/loss"]
    assert [step for step, _ in losses] == [1, 2, 3, 4]  # 32 pairs, batch 8
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert os.path.exists(os.path.join(str(tmp_path / "out"), "config.json"))
