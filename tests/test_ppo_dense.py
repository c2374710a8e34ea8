"""Dense per-token rewards for OpenRLHF's PPO (openrlhf_sepo/ppo_dense.py), in-process, no Ray: OpenRLHF's
``make_experience`` and ``compute_advantages_and_returns`` run for real on hand-made rollouts, with Ray's get/put
replaced by the identity and each group a local callable (OpenRLHF's own ``Actor`` models on CPU).

Checked against independent computations (a plain HF forward + log_softmax per unpadded sequence; reward-to-go in
Python): the oracle's dense reward, reuse of the reference's log-probs, the shaped reward and returns of GAE
(gamma = lambd = 1, zero values) and REINFORCE, padding / EOS positions, the token RM actor, the cross-tokenizer
oracle (totals preserved), and the refusals of bad flags (before any model load) and of group estimators.
"""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import tiny


def _ppo_stack_importable():
    """OpenRLHF's ``openrlhf/trainer/ray/__init__`` imports its vLLM engine, which needs ``vllm``: where none is
    installed (the CPU test machine), the vLLM stand-in is registered, as train_ppo_dense does
    (``openrlhf_sepo.vllm_standin``; an installed vllm is used as it is)."""
    from openrlhf_sepo import vllm_standin

    vllm_standin.install_if_missing()


_ppo_stack_importable()

from openrlhf.trainer.ppo_utils import experience_maker as em  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402
from openrlhf.utils.config import hierarchize  # noqa: E402

from openrlhf_sepo import ppo_dense  # noqa: E402
from openrlhf_sepo.ppo_dense import DenseFlagError, DensePlan  # noqa: E402

PROMPTS = ["Write a short note about the river.", "Write a short note about the harbor.",
           "Write a short note about the old stone castle today."]
RESPONSES = ["The river is calm. My note is clear kind.", "The harbor is soft and quiet. My note is wrong.",
             "The castle is old"]
ENDS_WITH_EOS = [True, True, False]  # the last one was cut at the length limit: no EOS


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def assets(tiny_dir, tmp_path_factory):
    """Policy tokenizer (vocab 512) models: ref = the tiny base, oracle and actor of other seeds; a second
    tokenizer (vocab 300, other merges) with its own oracle and ref; a token RM checkpoint on the policy's."""
    from openrlhf.models import get_llm_for_sequence_regression

    root = tmp_path_factory.mktemp("ppo_dense")
    tok = os.path.join(tiny_dir, "tokenizer")
    paths = {"tok": tok, "ref": os.path.join(tiny_dir, "base"),
             "oracle": tiny.build_model(str(root / "oracle"), tok, seed=1),
             "actor": tiny.build_model(str(root / "actor"), tok, seed=2)}
    tiny.build_tokenizer(str(root / "tok300"), 300)
    paths["tok300"] = str(root / "tok300")
    paths["oracle300"] = tiny.build_model(str(root / "oracle300"), paths["tok300"], seed=3)
    paths["ref300"] = tiny.build_model(str(root / "ref300"), paths["tok300"], seed=4)
    rm = get_llm_for_sequence_regression(paths["ref"], "critic", init_value_head=True, param_dtype="bf16",
                                         attn_implementation="sdpa")
    with torch.no_grad():
        rm.score.weight.mul_(20.0)  # rewards spread over the activation's range
    rm.config.value_head_prefix = "score"
    rm.config.token_rm = {"activation": "softplus", "aggregation": "avg", "tau": 2.0}
    paths["token_rm"] = str(root / "token_rm")
    rm.save_pretrained(paths["token_rm"])
    shutil.copytree(tok, paths["token_rm"], dirs_exist_ok=True)
    return paths


def _tokenizer(path):
    from openrlhf.utils import get_tokenizer

    return get_tokenizer(path, None, "right", None)


def _actor(path):
    """OpenRLHF's Actor, the model ReferenceModelActor wraps, in fp32 on CPU."""
    from openrlhf.models import Actor

    return Actor(path, attn_implementation="sdpa", param_dtype="bf16").float().eval()


@pytest.fixture(scope="module")
def models(assets):
    return {name: _actor(assets[name]) for name in ("ref", "oracle", "actor", "oracle300", "ref300")}


def rollout_samples(tokenizer, rewards):
    """Hand-made rollouts in OpenRLHF 0.11.2's layout (samples_generator): prompt + response from column 0,
    right-padded by ``Experience.concat_experiences``; action_mask = the response mask shifted by one (column j is
    token j + 1). -> (one Experience batch, per-sample (ids, prompt_len))."""
    singles, raw = [], []
    for i, (prompt, response, eos) in enumerate(zip(PROMPTS, RESPONSES, ENDS_WITH_EOS)):
        p_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        ids = torch.tensor(p_ids + r_ids)
        mask = torch.zeros(len(ids), dtype=torch.long)
        mask[len(p_ids):] = 1
        singles.append(Experience(sequences=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  action_mask=mask[1:][None].bool(), rewards=torch.tensor([rewards[i]]),
                                  index=[i], info={"reward": torch.tensor([rewards[i]])}))
        raw.append((ids.tolist(), len(p_ids)))
    assert len({len(ids) for ids, _ in raw}) > 1  # different lengths: the batch is padded
    return Experience.concat_experiences(singles, tokenizer.pad_token_id), raw


def hf_token_logps(path, ids, prompt_len):
    """Independent: log p(ids[t] | ids[<t]) for t >= prompt_len, a plain HF forward on the unpadded sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).float().eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(prompt_len, len(ids))])


class FakeRay:
    """Ray's put/get as the identity: a group's 'object refs' are its results."""

    put = staticmethod(lambda x: x)
    get = staticmethod(lambda x: x)


class LocalGroup:
    """A RayActorGroup stand-in: one actor, ``forward`` run here, sample by sample like execute_batch."""

    def __init__(self, forward, duplicate_actors=1):
        self.forward, self.duplicate_actors, self.calls = forward, duplicate_actors, 0

    def async_run_method_batch(self, method_name, **kwargs):
        assert method_name == "forward"
        self.calls += 1
        n = len(next(iter(kwargs.values())))
        return [[self.forward(**{k: v[i] for k, v in kwargs.items()}) for i in range(n)]]

    def async_run_method(self, method_name, *args, **kwargs):
        return []


def logps_group(model):
    return LocalGroup(lambda sequences, action_mask, attention_mask, **_:
                      model(sequences, action_mask, attention_mask).float().detach())


def ppo_args(estimator="gae", kl_coef=0.1, **dense):
    return SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False),
                             kl=SimpleNamespace(init_coef=kl_coef, use_loss=False, estimator="k1")),
        rollout=SimpleNamespace(n_samples_per_prompt=1),
        reward=SimpleNamespace(clip_range=None),
        train=SimpleNamespace(colocate_all=False, colocate_actor_ref=False, colocate_critic_reward=False),
        ds=SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1),
        dense=SimpleNamespace(**dense))


def make_maker(args, plan, groups, actor, ref, critic=None, tokenizer=None):
    strategy = SimpleNamespace(args=args)
    return ppo_dense.DenseExperienceMaker(actor, critic, None, ref, FixedKLController(args.algo.kl.init_coef),
                                          strategy, tokenizer, plan=plan, dense_groups=groups)


def reward_to_go(r):
    return torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])


def expected_shaped(raw, width, seq_rewards, seq_coef, kl_coef, dense_per_token, kl_per_token):
    """Independent R [B, width]: at response token t of sample i (column t - 1): dense + (-kl_coef * KL) and the
    scaled sequence reward at the last response token; 0 elsewhere."""
    R = torch.zeros(len(raw), width, dtype=torch.float64)
    for i, (ids, p) in enumerate(raw):
        for k, t in enumerate(range(p, len(ids))):
            R[i, t - 1] = dense_per_token[i][k] - kl_coef * kl_per_token[i][k]
        R[i, len(ids) - 2] += seq_coef * seq_rewards[i]
    return R


# --------------------------------------------------------------------------------- maths and the maker

def test_oracle_dense_rewards_against_an_independent_forward(assets, models):
    tok = _tokenizer(assets["tok"])
    batch, raw = rollout_samples(tok, [0.0] * 3)
    oracle = models["oracle"](batch.sequences, batch.action_mask, batch.attention_mask).float()
    ref = models["ref"](batch.sequences, batch.action_mask, batch.attention_mask).float()
    dense = ppo_dense.oracle_dense_rewards(oracle, ref, batch.action_mask, coef=0.7)
    for i, (ids, p) in enumerate(raw):
        want = 0.7 * (hf_token_logps(assets["oracle"], ids, p) - hf_token_logps(assets["ref"], ids, p))
        torch.testing.assert_close(dense[i, p - 1:len(ids) - 1], want, atol=1e-4, rtol=1e-4)
        assert (dense[i, :p - 1] == 0).all() and (dense[i, len(ids) - 1:] == 0).all()  # prompt and padding


@pytest.mark.parametrize("estimator", ["gae", "reinforce"])
def test_shaped_reward_and_returns_through_openrlhf_with_the_reference_reused(assets, models, monkeypatch,
                                                                              estimator):
    monkeypatch.setattr(em, "ray", FakeRay)
    tok = _tokenizer(assets["tok"])
    seq_rewards, coef, seq_coef, kl_coef = [1.5, -2.0, 0.25], 0.7, 0.5, 0.1
    batch, raw = rollout_samples(tok, seq_rewards)
    args = ppo_args(estimator, kl_coef)
    plan = DensePlan("oracle", coef=coef, seq_coef=seq_coef, oracle=assets["oracle"], dense_ref=assets["ref"],
                     reuse_reference=True, policy_tokenizer=assets["tok"])
    assert [name for name, _, _ in plan.groups()] == ["oracle"]  # no second copy of the reference
    ref_group, oracle_group = logps_group(models["ref"]), logps_group(models["oracle"])
    critic = LocalGroup(lambda action_mask, **_: torch.zeros(action_mask.shape)) if estimator == "gae" else None
    maker = make_maker(args, plan, {"oracle": oracle_group}, logps_group(models["actor"]), ref_group, critic, tok)

    [exp] = maker.compute_advantages_and_returns(maker.make_experience([batch]))
    assert ref_group.calls == 1 and oracle_group.calls == 1
    assert not hasattr(exp, "dense_rewards")  # consumed, not shipped to the actors

    dense, kl = [], []
    for ids, p in raw:
        o, r, a = (hf_token_logps(assets[m], ids, p) for m in ("oracle", "ref", "actor"))
        dense.append(coef * (o - r))
        kl.append(a - r)
    R = expected_shaped(raw, exp.action_mask.shape[1], seq_rewards, seq_coef, kl_coef, dense, kl)
    torch.testing.assert_close(exp.returns.double(), reward_to_go(R), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(exp.info["return"].double(), R.sum(1), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(exp.info["dense_reward"].double(), torch.stack([d.sum() for d in dense]).double(),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exp.info["reward"], torch.tensor(seq_rewards))  # logged unscaled
    # The pure formula gives the same per-token reward as the maker.
    shaped = ppo_dense.shaped_rewards(torch.tensor(seq_rewards), kl_coef,
                                      models["actor"](exp.sequences, exp.action_mask, exp.attention_mask).float()
                                      - models["ref"](exp.sequences, exp.action_mask, exp.attention_mask).float(),
                                      exp.action_mask,
                                      ppo_dense.oracle_dense_rewards(
                                          models["oracle"](exp.sequences, exp.action_mask, exp.attention_mask),
                                          models["ref"](exp.sequences, exp.action_mask, exp.attention_mask),
                                          exp.action_mask, coef), seq_coef)
    torch.testing.assert_close(shaped.double() * exp.action_mask, R, atol=2e-4, rtol=1e-4)


def test_without_a_reference_group_a_dense_ref_group_scores_and_the_eos_reward_lands_last(assets, models,
                                                                                          monkeypatch):
    monkeypatch.setattr(em, "ray", FakeRay)
    tok = _tokenizer(assets["tok"])
    seq_rewards = [3.0, -1.0, 2.0]
    batch, raw = rollout_samples(tok, seq_rewards)
    args = ppo_args("reinforce", kl_coef=0.0)  # kl.init_coef 0: OpenRLHF starts no reference group
    plan = DensePlan("oracle", coef=1.0, seq_coef=1.0, oracle=assets["oracle"], dense_ref=assets["ref"],
                     reuse_reference=False, policy_tokenizer=assets["tok"])
    groups = {"oracle": logps_group(models["oracle"]), "dense_ref": logps_group(models["ref"])}
    maker = make_maker(args, plan, groups, logps_group(models["actor"]), None, None, tok)
    experiences = maker.make_experience([batch])
    dense = experiences[0].dense_rewards.clone()
    [exp] = maker.compute_advantages_and_returns(experiences)
    for i, (ids, p) in enumerate(raw):
        last = len(ids) - 2  # the last action column: the EOS, or the last token of a cut response
        # The step at the last action token is the sequence reward plus that token's dense reward (no KL here).
        step = exp.returns[i, last] - (exp.returns[i, last + 1] if last + 1 < exp.returns.shape[1] else 0)
        torch.testing.assert_close(step, seq_rewards[i] + dense[i, last], atol=1e-5, rtol=1e-5)
        assert (dense[i, last + 1:] == 0).all() and (exp.returns[i, last + 1:] == 0).all()  # right padding
        assert (dense[i, :p - 1] == 0).all()  # the prompt
        want = hf_token_logps(assets["oracle"], ids, p) - hf_token_logps(assets["ref"], ids, p)
        torch.testing.assert_close(dense[i, p - 1:last + 1], want, atol=1e-4, rtol=1e-4)


def test_token_rm_actor_and_maker(assets, monkeypatch):
    from openrlhf_sepo.token_rm import load_token_rm, token_rewards

    monkeypatch.setattr(em, "ray", FakeRay)
    tok = _tokenizer(assets["tok"])
    batch, raw = rollout_samples(tok, [0.5, 0.5, 0.5])
    actor = object.__new__(ppo_dense._TokenRMActor)  # the Ray actor's class, without Ray
    actor.model, actor.settings = load_token_rm(assets["token_rm"], "fp32", "sdpa")
    actor.model.eval()
    out = actor.forward(batch.sequences, batch.action_mask, batch.attention_mask)
    for i, (ids, p) in enumerate(raw):
        with torch.no_grad():
            r = token_rewards(actor.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                              "softplus")[0]
        torch.testing.assert_close(out[i, p - 1:len(ids) - 1], r[p:], atol=1e-5, rtol=1e-5)
        assert (out[i, len(ids) - 1:] == 0).all() and (out[i, :p - 1] == 0).all()

    args = ppo_args("reinforce", kl_coef=0.0)
    plan = DensePlan("token_rm", coef=2.0, seq_coef=0.0, token_rm=assets["token_rm"], policy_tokenizer=assets["tok"])
    zeros = LocalGroup(lambda action_mask, **_: torch.zeros(action_mask.shape))
    maker = make_maker(args, plan, {"token_rm": LocalGroup(actor.forward)}, zeros, None, None, tok)
    [exp] = maker.compute_advantages_and_returns(maker.make_experience([batch]))
    torch.testing.assert_close(exp.returns, reward_to_go(2.0 * out), atol=1e-5, rtol=1e-5)  # seq_coef 0: dense only


# ------------------------------------------------------------------------------------------ cross tokenizer

def test_the_two_tokenizers_differ(assets):
    a, b = _tokenizer(assets["tok"]), _tokenizer(assets["tok300"])
    text = RESPONSES[0]
    assert a(text, add_special_tokens=False)["input_ids"] != b(text, add_special_tokens=False)["input_ids"]


def test_cross_tokenizer_rewards_keep_each_responses_oracle_total(assets, models, monkeypatch):
    policy_tok, oracle_tok = _tokenizer(assets["tok"]), _tokenizer(assets["tok300"])
    batch, raw = rollout_samples(policy_tok, [0.0] * 3)

    def log_ratio(seqs, amask, attn):
        return (models["oracle300"](seqs, amask, attn) - models["ref300"](seqs, amask, attn)).float().detach()

    out = ppo_dense.cross_tokenizer_forward(policy_tok, oracle_tok, log_ratio, batch.sequences, batch.action_mask,
                                            batch.attention_mask)
    for i, (ids, p) in enumerate(raw):
        # Independent oracle-token total: the oracle's tokens of the same text, scored one sequence at a time.
        prompt_text = policy_tok.decode(ids[:p])
        response_text = policy_tok.decode([t for t in ids[p:] if t != policy_tok.eos_token_id])
        text = prompt_text + response_text + (oracle_tok.eos_token if ENDS_WITH_EOS[i] else "")
        enc = oracle_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        o_ids = enc["input_ids"]
        o_p = sum(1 for _, e in enc["offset_mapping"] if e <= len(prompt_text))
        total = (hf_token_logps(assets["oracle300"], o_ids, o_p) - hf_token_logps(assets["ref300"], o_ids, o_p)).sum()
        torch.testing.assert_close(out[i].sum(), total, atol=1e-4, rtol=1e-4)
        assert (out[i, :p - 1] == 0).all() and (out[i, len(ids) - 1:] == 0).all()
        assert (out[i, p - 1:len(ids) - 1] != 0).any()
    # The map itself: EOS to EOS, every oracle token's weight sums to 1.
    ids, p = raw[0]
    _, o_p, tmap = ppo_dense.cross_tokenizer_map(policy_tok, oracle_tok, ids[:p], ids[p:])
    mapped = ppo_dense.map_rollout_rewards(tmap, torch.ones(tmap.n_src))
    assert tmap.n_dst == len(ids) - p and mapped.sum().item() == pytest.approx(tmap.n_src)
    eos_only = torch.zeros(tmap.n_src)
    eos_only[-1] = 1.0
    assert ppo_dense.map_rollout_rewards(tmap, eos_only)[-1].item() == pytest.approx(1.0)

    # Through the maker: the cross actor's output, scaled by coef, is the dense reward.
    monkeypatch.setattr(em, "ray", FakeRay)
    plan = DensePlan("oracle", coef=0.5, oracle=assets["oracle300"], dense_ref=assets["ref300"],
                     cross_tokenizer=True, policy_tokenizer=assets["tok"])
    zeros = LocalGroup(lambda action_mask, **_: torch.zeros(action_mask.shape))
    oracle_group = LocalGroup(lambda sequences, action_mask, attention_mask, **_: ppo_dense.cross_tokenizer_forward(
        policy_tok, oracle_tok, log_ratio, sequences, action_mask, attention_mask))
    maker = make_maker(ppo_args("reinforce", 0.0), plan, {"oracle": oracle_group}, zeros, None, None, policy_tok)
    [exp] = maker.make_experience([batch])
    torch.testing.assert_close(exp.info["dense_reward"], 0.5 * out.sum(1), atol=1e-5, rtol=1e-5)
    assert (exp.info["dense_mapping_failed"] == 0).all()


# ------------------------------------------------------------------------------------------------- flags

@pytest.fixture
def no_model_loads(monkeypatch):
    """Every model loader raises: a check that gets as far as loading weights fails the test."""
    import openrlhf.models
    import transformers

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded while checking flags")

    for name in ("Actor", "get_llm_for_sequence_regression"):
        monkeypatch.setattr(openrlhf.models, name, must_not_load)
    monkeypatch.setattr(ppo_dense, "load_token_rm", must_not_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)


def parse(argv, actor, estimator="gae", kl_coef=0.01):
    import argparse

    parser = argparse.ArgumentParser()
    ppo_dense.add_dense_flags(parser.add_argument)
    parser.add_argument("--actor.model_name_or_path", default=actor)
    parser.add_argument("--algo.advantage.estimator", default=estimator)
    parser.add_argument("--algo.kl.init_coef", type=float, default=kl_coef)
    return hierarchize(parser.parse_args(argv))


@pytest.fixture(scope="module")
def bad_token_rms(assets, tmp_path_factory):
    """Config-only checkpoints (no weights: the check never loads them): a token RM of the other tokenizer, and a
    plain causal LM."""
    root = tmp_path_factory.mktemp("bad_rms")
    other = root / "rm300"
    shutil.copytree(assets["tok300"], other)
    config = json.load(open(os.path.join(assets["oracle300"], "config.json")))
    config["token_rm"] = {"activation": "softplus", "aggregation": "avg", "tau": 2.0}
    json.dump(config, open(other / "config.json", "w"))
    return {"other_tokenizer": str(other), "plain": assets["oracle"]}


@pytest.mark.parametrize("argv, flag", [
    (["--dense.source", "oracle"], "--dense.oracle"),
    (["--dense.source", "token_rm"], "--dense.token_rm"),
    (["--dense.source", "oracle", "--dense.oracle", "{oracle}", "--dense.token_rm", "{token_rm}"], "--dense.token_rm"),
    (["--dense.source", "token_rm", "--dense.token_rm", "{token_rm}", "--dense.ref", "{ref}"], "--dense.ref"),
    (["--dense.source", "none", "--dense.oracle", "{oracle}"], "--dense.oracle"),
    (["--dense.source", "none", "--dense.coef", "0.5"], "--dense.coef"),
    (["--dense.source", "oracle", "--dense.oracle", "{oracle}", "--dense.coef", "0"], "--dense.coef"),
    (["--dense.source", "oracle", "--dense.oracle", "{oracle}", "--dense.seq_coef", "-1"], "--dense.seq_coef"),
    (["--dense.source", "oracle", "--dense.oracle", "{oracle}", "--dense.ref", "{ref300}"], "--dense.ref"),
    (["--dense.source", "oracle", "--dense.oracle", "{oracle300}"], "--dense.ref"),  # ref defaults to the policy
    (["--dense.source", "oracle", "--dense.oracle", "/nonexistent/oracle"], "--dense.oracle"),
    (["--dense.source", "token_rm", "--dense.token_rm", "{rm_other_tokenizer}"], "--dense.token_rm"),
    (["--dense.source", "token_rm", "--dense.token_rm", "{rm_plain}"], "--dense.token_rm"),
])
def test_bad_flags_are_refused_naming_the_flag_before_any_model_loads(assets, bad_token_rms, no_model_loads,
                                                                      argv, flag):
    paths = {**assets, "rm_other_tokenizer": bad_token_rms["other_tokenizer"], "rm_plain": bad_token_rms["plain"]}
    args = parse([a.format(**paths) for a in argv], assets["ref"])
    with pytest.raises(DenseFlagError, match=flag.replace(".", r"\.")):
        ppo_dense.check_dense_flags(args)


def test_the_source_is_required(assets):
    with pytest.raises(SystemExit):
        parse([], assets["ref"])
    args = SimpleNamespace(dense=SimpleNamespace(source=None, oracle=None, ref=None, token_rm=None, coef=1.0,
                                                 seq_coef=1.0))
    with pytest.raises(DenseFlagError, match=r"--dense\.source"):
        ppo_dense.check_dense_flags(args)


@pytest.mark.parametrize("estimator", ppo_dense.GROUP_ESTIMATORS)
@pytest.mark.parametrize("source", ["oracle", "token_rm"])
def test_group_estimators_are_refused(assets, no_model_loads, estimator, source):
    argv = ["--dense.source", source, f"--dense.{source}", assets[source]]
    with pytest.raises(DenseFlagError, match=r"--algo\.advantage\.estimator " + estimator):
        ppo_dense.check_dense_flags(parse(argv, assets["ref"], estimator=estimator))
    # none keeps OpenRLHF's PPO as it is, group estimators included.
    assert ppo_dense.check_dense_flags(parse(["--dense.source", "none"], assets["ref"], estimator)).source == "none"


def test_the_maker_refuses_a_group_estimator_too(assets):
    plan = DensePlan("oracle", oracle=assets["oracle"], dense_ref=assets["ref"], reuse_reference=True)
    with pytest.raises(DenseFlagError, match=r"--algo\.advantage\.estimator"):
        make_maker(ppo_args("group_norm"), plan, {"oracle": None}, None, None)


def test_plans(assets, no_model_loads):
    oracle = ["--dense.source", "oracle", "--dense.oracle", assets["oracle"]]
    reuse = ppo_dense.check_dense_flags(parse(oracle, assets["ref"]))
    assert reuse.reuse_reference and not reuse.cross_tokenizer and reuse.dense_ref == assets["ref"]
    assert [(n, c) for n, c, _ in reuse.groups()] == [("oracle", ppo_dense.ReferenceModelActor)]

    no_ref_group = ppo_dense.check_dense_flags(parse(oracle, assets["ref"], kl_coef=0.0))
    assert not no_ref_group.reuse_reference
    assert [(n, a) for n, _, a in no_ref_group.groups()] == [("oracle", (assets["oracle"],)),
                                                            ("dense_ref", (assets["ref"],))]

    other_ref = ppo_dense.check_dense_flags(parse(oracle + ["--dense.ref", assets["actor"]], assets["ref"]))
    assert not other_ref.reuse_reference and [n for n, _, _ in other_ref.groups()] == ["oracle", "dense_ref"]

    cross = ppo_dense.check_dense_flags(parse(["--dense.source", "oracle", "--dense.oracle", assets["oracle300"],
                                               "--dense.ref", assets["ref300"], "--dense.coef", "0.1"],
                                              assets["ref"], estimator="reinforce"))
    assert cross.cross_tokenizer and not cross.reuse_reference and cross.coef == 0.1
    assert cross.groups() == [("oracle", ppo_dense.CrossTokenizerOracleActor,
                               (assets["oracle300"], assets["ref300"], assets["ref"]))]

    rm = ppo_dense.check_dense_flags(parse(["--dense.source", "token_rm", "--dense.token_rm", assets["token_rm"],
                                            "--dense.seq_coef", "0"], assets["ref"]))
    assert rm.groups() == [("token_rm", ppo_dense.TokenRMActor, (assets["token_rm"],))] and rm.seq_coef == 0.0
    assert ppo_dense.check_dense_flags(parse(["--dense.source", "none"], assets["ref"])).groups() == []
