"""train_sepo end to end on CPU: the launcher with 2 gloo ranks (OpenRLHF's DeepSpeed, ZeRO-3) raises the
selected-token margin, its HF checkpoint loads with transformers, an OpenRLHF checkpoint resumes at the right
step, and bad input stops before any model is loaded."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sepo.loss import SePOLoss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "examples", "scripts", "train_selective_llama.sh")
TINY = ["--data.max_len", "128", "--train.batch_size", "8", "--train.micro_batch_size", "4", "--adam.lr", "1e-3"]


def key_word_scores(tokenizer):
    """score_fn for write_score_dir: +1 on the key-word tokens of the chosen response, -1 on those of the rejected
    one, small position-dependent values elsewhere."""
    from openrlhf_sepo.tiny import key_token_mask

    def scores(ids, prompt_len, side):
        sign = 1 if side == "chosen" else -1
        pieces = tokenizer.convert_ids_to_tokens(ids[prompt_len:])
        return [sign * 1.0 if key else 0.01 * ((j * 7) % 5) for j, key in enumerate(key_token_mask(pieces))]

    return scores


@pytest.fixture(scope="module")
def write_scores(tiny_pairs, write_score_dir):
    """write_scores(out, fingerprint=None) -> out: the tiny pairs (ids from OpenRLHF's RewardDataset(is_dpo=True))
    as a scores dir in the score_tokens format, scored by key_word_scores."""
    tokenizer, pairs = tiny_pairs

    def write(out, fingerprint=None):
        return write_score_dir(out, tokenizer, pairs, key_word_scores(tokenizer), fingerprint=fingerprint)

    return write


def selected_margin(model_dir, dataset):
    """Mean over the data set of u_w - u_l (selected-token mean log-probs), with a plain transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    c_ids, c_att, r_ids, r_att, key_tokens = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
    u = []
    with torch.no_grad():
        for ids, att, mask in ((c_ids, c_att, key_tokens.chosen_mask), (r_ids, r_att, key_tokens.rejected_mask)):
            logps = model(ids, attention_mask=att).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            u.append(SePOLoss.selected_mean(logps, mask))
    return (u[0] - u[1]).mean().item()


@pytest.fixture(scope="module")
def trained(tiny_dir, write_scores, tmp_path_factory):
    """SEPO_DEVICE=cpu train_selective_llama.sh (its ZeRO-3, bf16, gradient checkpointing defaults) on 2 ranks:
    48 pairs, batch 8 -> 6 steps, an OpenRLHF checkpoint every 2 steps."""
    work = tmp_path_factory.mktemp("sepo_train")
    scores = write_scores(str(work / "scores"))
    paths = SimpleNamespace(scores=scores, out=str(work / "out"), ckpt=str(work / "ckpt"), tb=str(work / "tb"))
    env = {**os.environ, "SEPO_DEVICE": "cpu", "SEPO_NPROC": "2", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = ["bash", LAUNCHER, "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", scores,
           *TINY, "--ckpt.output_dir", paths.out, "--ckpt.path", paths.ckpt, "--ckpt.save_steps", "2",
           "--logger.tensorboard_dir", paths.tb]
    proc = subprocess.run(cmd, cwd=str(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    paths.log = proc.stdout
    return paths


@pytest.mark.slow
def test_two_rank_launcher_run_raises_selected_margin(tiny_dir, tiny_pairs, trained, tb_scalars):
    from openrlhf_sepo.datasets import TokenScoreDataset

    assert "--ds.zero_stage 3" in trained.log and "--nproc_per_node 2" in trained.log
    tokenizer, _ = tiny_pairs
    dataset = TokenScoreDataset(trained.scores, tokenizer, 128)
    before = selected_margin(os.path.join(tiny_dir, "base"), dataset)
    after = selected_margin(trained.out, dataset)  # the HF checkpoint, loaded by transformers
    assert after > before + 0.2, (before, after)

    logs = tb_scalars(trained.tb)
    for metric in ("loss", "acc", "chosen_reward", "reject_reward", "chosen_logps", "rejected_logps", "margin",
                   "selected_frac", "lr", "grad_norm", "loss_mean", "acc_mean",
                   "nll_loss"):  # the default NLL term, on the selected-positions forward
        values = logs[f"train/{metric}"]
        assert [step for step, _ in values] == [1, 2, 3, 4, 5, 6], metric
        assert all(torch.isfinite(torch.tensor(v)) for _, v in values), metric
    margin = [v for _, v in logs["train/margin"]]
    assert margin[-1] > margin[0] + 0.2
    for (_, c), (_, r), (_, m) in zip(logs["train/chosen_logps"], logs["train/rejected_logps"], logs["train/margin"]):
        assert m == pytest.approx(c - r, abs=1e-4)
    # k = 0.3 of each response, floor'd (n = max(1, floor(0.3 * N)) lies below 0.3 for short responses)
    assert all(0.15 < v < 0.35 for _, v in logs["train/selected_frac"])


@pytest.mark.slow
def test_resume_continues_at_the_right_step_with_eval_and_nll(tiny_dir, trained, run, tb_scalars, tmp_path):
    # Make the step-4 checkpoint the latest, as if the run had stopped there (mid-epoch: 32 of 48 samples).
    assert os.path.isdir(os.path.join(trained.ckpt, "global_step4"))
    with open(os.path.join(trained.ckpt, "latest"), "w") as f:
        f.write("global_step4")
    tb = str(tmp_path / "tb")
    proc = run("openrlhf_sepo.cli.train_sepo", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", trained.scores, *TINY,
        "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "3", "--model.gradient_checkpointing_enable",
        "--ckpt.path", trained.ckpt, "--ckpt.load_enable", "--ckpt.output_dir", str(tmp_path / "out"),
        "--logger.tensorboard_dir", tb, "--eval.dataset", trained.scores, "--eval.steps", "1",
        "--model.nll_loss_coef", "0.1", "--sepo.selection", "random",
    ], nproc=2)
    assert "consumed_samples: 32" in proc.stdout
    assert "random selection keeps" in proc.stdout
    logs = tb_scalars(tb)
    assert [step for step, _ in logs["train/loss"]] == [5, 6]
    # OpenRLHF's evaluate() and NLL term run unchanged on SePO batches
    assert [step for step, _ in logs["eval/eval_loss"]] == [5, 6] and [s for s, _ in logs["eval/acc_mean"]] == [5, 6]
    assert all(0 < v < 10 for _, v in logs["train/nll_loss"] + logs["eval/eval_loss"])


def test_tokenizer_mismatch_stops_before_the_model_loads(tiny_dir, write_scores, tmp_path, capsys, no_model_loads):
    from openrlhf_sepo.cli import train_sepo

    scores = write_scores(str(tmp_path / "scores"), fingerprint="0123456789abcdef")
    assert train_sepo.main(["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", scores,
                            *TINY]) == 1
    err = capsys.readouterr().err
    assert "train_sepo: error:" in err and "fingerprint 0123456789abcdef" in err
    assert "Re-score with the policy's tokenizer" in err


@pytest.mark.parametrize("flags,message", [
    (["--data.dataset", "/nonexistent/scores"], "--data.dataset: scores dir '/nonexistent/scores' does not exist"),
    (["--sepo.k_chosen", "0"], "argument --sepo.k_chosen: 0.0 is outside (0, 1]"),
    (["--sepo.k_rejected", "1.5"], "argument --sepo.k_rejected: 1.5 is outside (0, 1]"),
    (["--sepo.selection", "topk"], "argument --sepo.selection: invalid choice: 'topk'"),
    (["--sepo.beta", "0"], "--sepo.beta must be > 0"),
])
def test_bad_flags_are_refused_before_training(tiny_dir, write_scores, tmp_path, capsys, flags, message):
    from openrlhf_sepo.cli import train_sepo

    scores = write_scores(str(tmp_path / "scores"))
    argv = ["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", scores, *flags]
    with pytest.raises(SystemExit) as exit_info:
        train_sepo.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_keeps_train_dpo_names_and_defaults():
    """Shared flags have train_dpo's names and defaults (but the NLL term, on by default: docs/sepo.md); no --ref.*
    and no DPO-only loss flags."""
    from openrlhf_sepo.cli import train_sepo

    parser = train_sepo.build_parser()
    defaults = {a.dest: a.default for a in parser._actions}
    assert not [d for d in defaults if d.startswith("ref.") or d in ("model.beta", "model.ipo_enable")]
    for dest, value in {"train.micro_batch_size": 8, "train.batch_size": 128, "adam.lr": 1e-5, "ds.zero_stage": 2,
                        "data.max_len": 512, "train.max_epochs": 1, "model.nll_loss_coef": 1.0, "local_rank": -1,
                        "sepo.k_chosen": 0.3, "sepo.k_rejected": 0.3, "sepo.selection": "per_response",
                        "sepo.beta": 1.0, "sepo.gamma": 0.0, "sepo.exclude_common_prefix": False}.items():
        assert defaults[dest] == value, dest


@pytest.mark.parametrize("flags,selection,exclude,seed", [
    ([], "per_response", False, 42),
    (["--sepo.selection", "random", "--train.seed", "7"], "random", False, 7),
    (["--sepo.selection", "global", "--sepo.exclude_common_prefix"], "global", True, 42),
    (["--sepo.selection", "random", "--sepo.exclude_common_prefix"], "random", True, 42),
])
def test_selection_flags_reach_the_dataset(tiny_dir, tiny_pairs, write_scores, tmp_path, flags, selection, exclude,
                                          seed):
    """--sepo.selection, --sepo.exclude_common_prefix and --train.seed (the random selection's seed) are what
    train() hands TokenScoreDataset, and the masks are the ones that dataset makes by itself."""
    from openrlhf_sepo.cli import train_sepo
    from openrlhf_sepo.datasets import TokenScoreDataset

    tokenizer, _ = tiny_pairs
    scores = write_scores(str(tmp_path / "scores"))
    args = train_sepo.parse_args(["--model.model_name_or_path", os.path.join(tiny_dir, "base"),
                                  "--data.dataset", scores, *TINY, *flags])
    ds = train_sepo.score_dataset(args, tokenizer, None)
    assert (ds.selection, ds.exclude_common_prefix, ds.seed) == (selection, exclude, seed)
    direct = TokenScoreDataset(scores, tokenizer, 128, selection=selection, exclude_common_prefix=exclude, seed=seed)
    for side in ("chosen", "rejected"):
        assert (ds.selected[side] == direct.selected[side]).all()


# Both paths run the same model and LM head and an fp32 log-softmax (bitwise equal on this CPU); the tolerances allow
# for an LM head matmul over fewer rows rounding differently elsewhere (bf16: weights and gradients in bf16).
TOLERANCES = {"fp32": dict(atol=1e-5, rtol=1e-4), "bf16": dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype,nll", [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)])
def test_selected_positions_forward_equals_openrlhf_full_forward(tiny_dir, tiny_pairs, dtype, nll):
    """The default policy forward (LM head and log-softmax at the selected positions, plus every chosen response
    token when the NLL term is on) gives OpenRLHF's concatenated_forward through Actor.forward: the same log-probs
    at every selected position, the same NLL, loss and gradients; and it computes logits at no other position
    (not at the prompt, padding or unselected rejected tokens). The trainer here is a shell holding only what the
    forward reads (fit() itself runs in the 2-rank tests above); the Actor is OpenRLHF's, not wrapped by
    DeepSpeed, which the 2-rank ZeRO-3 run covers."""
    from openrlhf.models import Actor
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    from openrlhf_sepo.datasets import KeyTokens
    from openrlhf_sepo.scoring import select_key_tokens
    from openrlhf_sepo.trainer import NoReferenceModel, SelectiveDPOTrainer

    tokenizer, pairs = tiny_pairs
    actor = Actor(os.path.join(tiny_dir, "base"), attn_implementation="sdpa", param_dtype="bf16")
    if dtype == "fp32":
        actor = actor.float()
    trainer = object.__new__(SelectiveDPOTrainer)
    trainer.tokenizer, trainer.ref_model, trainer._step_logs, trainer.nll_loss = tokenizer, NoReferenceModel(), {}, nll
    trainer.confidence = False
    trainer.strategy = SimpleNamespace(ring_attn_group=None)

    # Prompt lengths 14, 16, 18 (the tiny prompts all have 14 tokens: the next 0, 2, 4 response tokens are counted
    # as prompt here) and chosen lengths 30, 29, 28: rows differ in prompt and padding.
    batch = [(p + 2 * i, c, r) for i, (p, c, r) in enumerate(pairs[:3])]
    assert len({p for p, _, _ in batch}) == 3 and len({len(c) for _, c, _ in batch}) == 3
    pad = tokenizer.pad_token_id
    sides = []
    for col, largest in ((1, True), (2, False)):
        width = max(len(p[col]) for p in batch)
        ids = torch.full((len(batch), width), pad)
        att = torch.zeros_like(ids)
        mask = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for i, (prompt_len, *seqs) in enumerate(batch):
            seq = seqs[col - 1]
            ids[i, : len(seq)], att[i, : len(seq)] = torch.tensor(seq), 1
            scores = torch.sin(torch.tensor(seq[prompt_len:], dtype=torch.float) * 1.3)
            mask[i, prompt_len - 1 : len(seq) - 1] = select_key_tokens(scores, 0.3, largest)
        sides.append((ids, att, mask))
    (c_ids, c_att, c_sel), (r_ids, r_att, r_sel) = sides
    key_tokens = KeyTokens([p[0] for p in batch], c_sel, r_sel)

    computed = []  # the positions the selected-positions forward ran the LM head at
    logps_at = trainer._logps_at
    trainer._logps_at = lambda model, ids, att, selected: computed.append(selected.clone()) or logps_at(
        model, ids, att, selected)

    results = {}
    for selected_only in (True, False):
        trainer.selected_positions_only = selected_only
        actor.zero_grad()
        chosen, rejected, _, nll_loss = trainer.concatenated_forward(actor, c_ids, c_att, r_ids, r_att, key_tokens)
        width = max(c_ids.shape[1], r_ids.shape[1]) - 1
        c_mask, r_mask = (torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in (c_sel, r_sel))
        loss, _, _ = SePOLoss(beta=2.0)(chosen, rejected, c_mask, r_mask)
        if nll:
            loss = loss + 0.7 * nll_loss  # as fit() adds it, with a coefficient
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in actor.parameters() if p.grad is not None])
        results[selected_only] = (chosen[c_mask].detach(), rejected[r_mask].detach(), loss.item(),
                                  nll_loss.item() if nll else None, grads)

    (c_fast, r_fast, loss_fast, nll_fast, g_fast), (c_full, r_full, loss_full, nll_full, g_full) = results.values()
    tol = TOLERANCES[dtype]
    assert c_fast.numel() == int(c_sel.sum()) > 0 and r_fast.numel() == int(r_sel.sum()) > 0
    torch.testing.assert_close(c_fast, c_full, **tol)
    torch.testing.assert_close(r_fast, r_full, **tol)
    assert loss_fast == pytest.approx(loss_full, abs=tol["atol"], rel=tol["rtol"])
    torch.testing.assert_close(g_fast, g_full, **tol)

    # Where the LM head ran: the rejected side's selected tokens, and on the chosen side the selected tokens or,
    # with the NLL, exactly the tokens OpenRLHF's _get_batch_logps averages (counted here by OpenRLHF itself).
    (positions,) = computed
    n = len(batch)
    assert torch.equal(positions[n:], r_mask.bool())
    if nll:
        assert nll_fast == pytest.approx(nll_full, abs=tol["atol"], rel=tol["rtol"]) and nll_full > 0
        # OpenRLHF's NLL mask, one position at a time: the sum of a one-hot at t is 1 iff t is in the mask
        att = torch.nn.functional.pad(c_att, (0, width + 1 - c_att.shape[1]))
        one_hot = torch.eye(width)
        nll_mask = torch.stack([DPOTrainer._get_batch_logps(trainer, one_hot[t].expand(n, width), att,
                                                            key_tokens.prompt_id_lens)[0] for t in range(width)], 1)
        assert torch.equal(positions[:n], nll_mask.bool())
    else:
        assert torch.equal(positions[:n], c_mask.bool())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logprobs_backward_equals_autograd(dtype):
    """LabelLogProbs (the selected-positions forward's log-softmax, with its one-buffer backward) gives autograd's
    log-probs and logits gradient for log_softmax(z.float()).gather(label)."""
    from openrlhf_sepo.scoring import LabelLogProbs

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 501, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 501, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    results = []
    for fn in (LabelLogProbs.apply,
               lambda z, y: torch.log_softmax(z.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)):
        z = logits.clone().requires_grad_()
        out = fn(z, labels)
        (out * upstream).sum().backward()
        results.append((out.detach(), z.grad))
    (out, grad), (out_ref, grad_ref) = results
    assert out.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # bf16: one rounding
    torch.testing.assert_close(grad, grad_ref, **tol)
