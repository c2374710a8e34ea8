"""Dense per-token rewards for OpenRLHF's PPO (issue 19): RTO ("DPO meets PPO", ICML 2025) and token PPO from a
learned token reward model.

OpenRLHF's PPO is a bandit: ``compute_reward`` puts the sequence reward at the last action token and adds
``-kl_coef * KL_t`` at every action token. Here each action token t (a policy token y_t of the rollout) also gets

    oracle    (RTO)   d_t = coef * (log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))
    token_rm          d_t = coef * r_t,   r_t the token RM's reward of y_t (token_rm.token_rewards)

and the per-token reward that GAE / REINFORCE consume is

    R_t = compute_reward(seq_coef * r_seq, kl_coef, KL, action_mask, clip)_t + d_t * action_mask_t

(``compute_reward`` is OpenRLHF's own, called, not copied). ``coef`` is RTO's beta_1: it multiplies the plain
log-ratio, so with the default 1.0 the per-response sum of d_t is log pi_oracle(y|x) / pi_ref(y|x), the same numbers
``score_tokens`` writes for ``oracle_ref`` (the DPO implicit reward divided by the oracle's DPO beta; pass
``--dense.coef BETA_DPO`` to put it on the DPO reward's scale).

Cross-tokenizer oracle: an oracle + reference of another tokenizer read each rollout as text (its prompt and
response decoded from the policy's ids), score it on their own tokens, and the scores are moved onto the policy's
tokens with ``token_map.map_tokens`` (character overlap, each response's total preserved).

API (for the trainer that starts the groups, branch ppo-runtime):

- ``add_dense_flags(parser.add_argument)``; after ``hierarchize``: ``plan = check_dense_flags(args)``, before any
  model loads (``DenseFlagError`` naming the flag otherwise). ``plan.groups()`` -> ``[(name, actor_class,
  init_args)]``: start ``RayActorGroup(..., actor_class, duplicate_actors=ring*tp)`` for each and call
  ``group.async_init_model_from_pretrained(strategy, *init_args)``. Names: ``"oracle"``, ``"dense_ref"``,
  ``"token_rm"``. With ``plan.reuse_reference`` no dense-ref group is made: PPO's reference group's log-probs are
  reused.
- ``DenseExperienceMaker(actor, critic, reward, reference, kl_ctl, strategy, tokenizer, plan=plan,
  dense_groups={name: group})``: replaces ``RemoteExperienceMaker`` (same positional arguments). Every group's
  ``forward(sequences, action_mask, attention_mask)`` returns a [B, A] per-action tensor (OpenRLHF's reference
  contract). It logs ``dense_reward`` (per-sample sum of d_t), ``dense_abs_mean`` (mean |d_t| over action tokens)
  and, cross-tokenizer, ``dense_mapping_failed`` in ``experience.info``.
- Actors: OpenRLHF's ``ReferenceModelActor`` (oracle / dense ref of the policy's tokenizer: it already returns
  log-probs), ``TokenRMActor``, ``CrossTokenizerOracleActor``.
- Pure maths: ``oracle_dense_rewards``, ``token_rm_dense_rewards``, ``shaped_rewards``, ``cross_tokenizer_map``,
  ``map_rollout_rewards``.

Advantage estimators: ``gae`` and ``reinforce`` (reward-to-go) take per-token rewards soundly. The group-baseline
estimators (rloo, reinforce_baseline, group_norm, dr_grpo, flash_reinforce) baseline or normalise the scalar
sequence reward only, before ``compute_reward``: a dense term would enter un-baselined and, for group_norm, on
another scale than the normalised sequence reward; they are refused (``--algo.advantage.estimator``).

Rollout temperature: OpenRLHF's reference actors divide logits by ``--rollout.temperature``; the oracle and dense
reference are read the same way, so both sides of the log-ratio describe the same (tempered) distributions.
"""

import math
import os
from typing import NamedTuple, Optional

import ray
import torch
from openrlhf.models.utils import compute_reward, masked_mean
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ray.launcher import ReferenceModelActor

from openrlhf_sepo.scoring import tokenizer_fingerprint
from openrlhf_sepo.token_map import MappingError, TokenMap, map_tokens, special_ids
from openrlhf_sepo.token_rm import checkpoint_settings, load_token_rm, token_rewards

SOURCES = ("none", "oracle", "token_rm")
SOUND_ESTIMATORS = ("gae", "reinforce")
GROUP_ESTIMATORS = ("rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce")
DEFAULT_COEF = 1.0
DEFAULT_SEQ_COEF = 1.0


class DenseFlagError(ValueError):
    """A ``--dense.*`` set-up that cannot run; the message names the flag. Raised before any model loads."""


# --------------------------------------------------------------------------------------------------- flags

def add_dense_flags(add):
    """Add the ``--dense.*`` flags with ``add`` (a parser's ``add_argument``)."""
    add("--dense.source", choices=SOURCES, required=True,
        help="per-token reward added to PPO's shaped reward: 'none' (OpenRLHF's bandit PPO, unchanged), 'oracle' "
             "(RTO: coef * (log pi_oracle - log pi_ref) of each sampled token) or 'token_rm' (coef * a learned token "
             "reward model's per-token reward). Required: say which")
    add("--dense.oracle", default=None,
        help="--dense.source oracle: the oracle policy (e.g. a DPO model) whose log-probs give r_t; of the policy's "
             "tokenizer (an OpenRLHF reference actor scores it) or of another (scored on its own tokens, mapped "
             "onto the policy's)")
    add("--dense.ref", default=None,
        help="--dense.source oracle: the reference of the oracle's log-ratio. Default: PPO's reference (the actor's "
             "init model), whose log-probs PPO already computes and are reused. Must share the oracle's tokenizer")
    add("--dense.token_rm", default=None,
        help="--dense.source token_rm: a train_token_rm checkpoint (policy's tokenizer) giving r_t per token")
    add("--dense.coef", type=float, default=DEFAULT_COEF,
        help="scale of the dense reward d_t = coef * r_t (RTO's beta_1; 1.0: the oracle's summed d_t is log "
             "pi_oracle(y|x)/pi_ref(y|x), the score_tokens numbers; the oracle's DPO beta puts it on DPO's reward scale)")
    add("--dense.seq_coef", type=float, default=DEFAULT_SEQ_COEF,
        help="scale of the sequence reward (reward model / remote reward) placed at the last action token "
             "(0: dense reward only). Length penalties are added after it, unscaled")


class DensePlan(NamedTuple):
    """What ``check_dense_flags`` decided: the sources, their paths and the Ray groups to start.

    ``dense_ref``: the dense reference's path (also inside the cross-tokenizer actor); ``reuse_reference``: it is
    PPO's reference and its group's log-probs are reused (no dense-ref group); ``cross_tokenizer``: the oracle's
    tokenizer differs from the policy's (one ``CrossTokenizerOracleActor`` group holds oracle and reference).
    """

    source: str
    coef: float = DEFAULT_COEF
    seq_coef: float = DEFAULT_SEQ_COEF
    oracle: Optional[str] = None
    dense_ref: Optional[str] = None
    reuse_reference: bool = False
    token_rm: Optional[str] = None
    cross_tokenizer: bool = False
    policy_tokenizer: Optional[str] = None

    def groups(self) -> list:
        """``[(name, ray actor class, init args after strategy)]`` of the dense groups to start."""
        if self.source == "token_rm":
            return [("token_rm", TokenRMActor, (self.token_rm,))]
        if self.source != "oracle":
            return []
        if self.cross_tokenizer:
            return [("oracle", CrossTokenizerOracleActor, (self.oracle, self.dense_ref, self.policy_tokenizer))]
        groups = [("oracle", ReferenceModelActor, (self.oracle,))]
        if not self.reuse_reference:
            groups.append(("dense_ref", ReferenceModelActor, (self.dense_ref,)))
        return groups


def _same_path(a, b) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_estimator(estimator: str) -> None:
    """``DenseFlagError`` unless ``estimator`` takes per-token rewards soundly (see the module docstring)."""
    if estimator in GROUP_ESTIMATORS:
        raise DenseFlagError(
            f"--algo.advantage.estimator {estimator} baselines/normalises only the scalar sequence reward before "
            f"compute_reward, so a dense per-token reward would enter un-baselined (and, for group_norm, on another "
            f"scale): use one of {SOUND_ESTIMATORS} with --dense.source oracle/token_rm")
    if estimator not in SOUND_ESTIMATORS:
        raise DenseFlagError(f"--algo.advantage.estimator {estimator!r}: dense rewards support {SOUND_ESTIMATORS}")


def _tokenizer(args, path, flag):
    from openrlhf.utils import get_tokenizer

    use_fast = not getattr(getattr(args, "data", None), "disable_fast_tokenizer", False)
    try:
        return get_tokenizer(path, None, "right", None, use_fast=use_fast)
    except Exception as e:  # noqa: BLE001  (re-raised with the flag that named the path)
        raise DenseFlagError(f"{flag}: cannot load a tokenizer from {path!r}: {e}") from None


def check_dense_flags(args) -> DensePlan:
    """Check the ``--dense.*`` flags of a hierarchized namespace against the PPO flags; -> ``DensePlan``.

    Reads tokenizers and config files only (never weights). ``DenseFlagError`` naming the flag for: no source; a
    source without its path; a path given for another source; a non-finite or non-positive ``--dense.coef``, a
    negative ``--dense.seq_coef``, either changed with source none; a group-baseline estimator; oracle and dense
    reference of different tokenizers; a cross-tokenizer oracle whose tokenizers give no character offsets; a
    dense reference defaulting to the policy for an oracle of another tokenizer; a token RM that is not a
    train_token_rm checkpoint or not of the policy's tokenizer.
    """
    dense = args.dense
    source = getattr(dense, "source", None)
    if source not in SOURCES:
        raise DenseFlagError(f"--dense.source must be one of {SOURCES} (got {source!r}): say which dense reward, "
                             f"'none' for OpenRLHF's PPO unchanged")
    paths = {"oracle": dense.oracle, "ref": dense.ref, "token_rm": dense.token_rm}
    allowed = {"none": (), "oracle": ("oracle", "ref"), "token_rm": ("token_rm",)}[source]
    for name, path in paths.items():
        if path is not None and name not in allowed:
            raise DenseFlagError(f"--dense.{name} {path!r} is given but --dense.source is {source!r}: it would be "
                                 f"ignored")
    coef, seq_coef = float(dense.coef), float(dense.seq_coef)
    if source == "none":
        for name, value, default in (("coef", coef, DEFAULT_COEF), ("seq_coef", seq_coef, DEFAULT_SEQ_COEF)):
            if value != default:
                raise DenseFlagError(f"--dense.{name} {value} has no effect with --dense.source none")
        return DensePlan("none")
    if not (math.isfinite(coef) and coef > 0):
        raise DenseFlagError(f"--dense.coef must be finite and > 0 (got {coef}); no dense reward is --dense.source none")
    if not (math.isfinite(seq_coef) and seq_coef >= 0):
        raise DenseFlagError(f"--dense.seq_coef must be finite and >= 0 (got {seq_coef})")
    check_estimator(args.algo.advantage.estimator)

    actor = args.actor.model_name_or_path
    policy_tok = _tokenizer(args, actor, "--actor.model_name_or_path")
    policy_fp = tokenizer_fingerprint(policy_tok)
    plan = dict(source=source, coef=coef, seq_coef=seq_coef, policy_tokenizer=actor)

    if source == "token_rm":
        if dense.token_rm is None:
            raise DenseFlagError("--dense.source token_rm needs --dense.token_rm PATH (a train_token_rm checkpoint)")
        from transformers import AutoConfig

        try:
            checkpoint_settings(AutoConfig.from_pretrained(dense.token_rm, trust_remote_code=True).to_dict(),
                                dense.token_rm)
        except Exception as e:  # noqa: BLE001  (not a config, or not a token RM's)
            raise DenseFlagError(f"--dense.token_rm: {e}") from None
        rm_fp = tokenizer_fingerprint(_tokenizer(args, dense.token_rm, "--dense.token_rm"))
        if rm_fp != policy_fp:
            raise DenseFlagError(f"--dense.token_rm {dense.token_rm!r} has another tokenizer than the policy "
                                 f"(--actor.model_name_or_path; fingerprints {rm_fp} vs {policy_fp}): a token RM's "
                                 f"rewards are read on the policy's own tokens, there is no mapping for them")
        return DensePlan(token_rm=dense.token_rm, **plan)

    if dense.oracle is None:
        raise DenseFlagError("--dense.source oracle needs --dense.oracle PATH (the oracle policy)")
    oracle_tok = _tokenizer(args, dense.oracle, "--dense.oracle")
    oracle_fp = tokenizer_fingerprint(oracle_tok)
    ref = dense.ref if dense.ref is not None else actor
    ref_flag = "--dense.ref" if dense.ref is not None else "--dense.ref (default: --actor.model_name_or_path)"
    ref_fp = policy_fp if ref == actor else tokenizer_fingerprint(_tokenizer(args, ref, "--dense.ref"))
    if ref_fp != oracle_fp:
        hint = ("; the oracle has another tokenizer than the policy, so --dense.ref must name a reference of the "
                "oracle's tokenizer" if dense.ref is None else "")
        raise DenseFlagError(f"{ref_flag} {ref!r} and --dense.oracle {dense.oracle!r} have different tokenizers "
                             f"(fingerprints {ref_fp} vs {oracle_fp}): the log-ratio compares them id by id{hint}")
    cross = oracle_fp != policy_fp
    if cross:
        for flag, tok in (("--actor.model_name_or_path", policy_tok), ("--dense.oracle", oracle_tok)):
            if not getattr(tok, "is_fast", False):
                raise DenseFlagError(f"{flag}: a cross-tokenizer oracle maps tokens by character offsets, which needs "
                                     f"fast tokenizers ({type(tok).__name__} is not one)")
    reference_exists = args.algo.kl.init_coef > 0  # OpenRLHF starts its reference group only then
    reuse = not cross and reference_exists and _same_path(ref, actor)
    return DensePlan(oracle=dense.oracle, dense_ref=ref, reuse_reference=reuse, cross_tokenizer=cross, **plan)


# --------------------------------------------------------------------------------------------------- maths

def oracle_dense_rewards(oracle_logps, ref_logps, action_mask, coef: float = DEFAULT_COEF) -> torch.Tensor:
    """RTO's dense reward, [B, A] fp32: ``d_t = coef * (log pi_oracle(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t))`` at the
    action tokens (``action_mask`` 1), 0 elsewhere. Inputs: [B, A] action log-probs (OpenRLHF's actor layout)."""
    mask = action_mask.float()
    return coef * (oracle_logps.float() - ref_logps.float()) * mask


def token_rm_dense_rewards(rm_rewards, action_mask, coef: float = DEFAULT_COEF) -> torch.Tensor:
    """Token-RM dense reward, [B, A] fp32: ``d_t = coef * r_t`` at the action tokens, 0 elsewhere."""
    return coef * rm_rewards.float() * action_mask.float()


def add_dense(rewards, dense, action_mask) -> torch.Tensor:
    """``rewards + dense * action_mask`` in at least fp32 (the shaped reward's dense term)."""
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    return rewards.to(dtype) + dense.to(dtype) * action_mask.to(dtype)


def shaped_rewards(seq_rewards, kl_coef, kl, action_mask, dense, seq_coef: float = DEFAULT_SEQ_COEF,
                   reward_clip_range=None) -> torch.Tensor:
    """The per-token reward of dense PPO, [B, A]:
    ``compute_reward(seq_coef * r_seq, kl_coef, kl, action_mask, clip)_t + d_t * action_mask_t``: the scaled
    sequence reward (clipped) at the last action token, ``-kl_coef * KL_t`` everywhere, plus the dense reward.
    ``DenseExperienceMaker`` produces exactly this inside OpenRLHF's ``compute_advantages_and_returns``."""
    base = compute_reward(seq_rewards.float() * seq_coef, kl_coef, kl, action_mask=action_mask,
                          reward_clip_range=reward_clip_range)
    return add_dense(base, dense, action_mask)


# ------------------------------------------------------------------------------------- cross-tokenizer mapping

def _token_spans(tokenizer, ids):
    """-> (``decode(ids)``, [(start, end)] per id): each token's characters in context, i.e. what ``decode(ids[:k+1])``
    adds to ``decode(ids[:k])``. Computed in windows of a few tokens and checked against the whole decode; on a
    mismatch (a character split across tokens, a decoder that rewrites across tokens) every prefix is decoded
    (quadratic) and a token owns the characters from the first one its prefix decode changed."""
    full = tokenizer.decode(ids)
    window, spans, pos = 4, [], 0
    for k in range(len(ids)):
        lo = max(0, k - window)
        before, upto = tokenizer.decode(ids[lo:k]), tokenizer.decode(ids[lo:k + 1])
        piece = upto[len(before):] if upto.startswith(before) else None
        if piece is None:
            break
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    if len(spans) == len(ids) and pos == len(full):
        return full, spans
    spans, prev = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[:k + 1])
        start = min(len(os.path.commonprefix([prev, text])), len(full))
        spans.append((start, max(start, min(len(text), len(full)))))
        prev = text
    return full, spans


def _policy_response_tokens(tokenizer, response_ids, specials):
    """-> (content text, [(start, end, special)]) of the policy's sampled response ids: special tokens are
    zero-width (their text is not part of the content the oracle reads)."""
    content = [i for i in response_ids if i not in specials]
    text, spans = _token_spans(tokenizer, content) if content else ("", [])
    tokens, k, last_end = [], 0, 0
    for i in response_ids:
        if i in specials:
            tokens.append((last_end, last_end, True))
        else:
            tokens.append((*spans[k], False))
            last_end, k = spans[k][1], k + 1
    return text, tokens


def cross_tokenizer_map(policy_tok, oracle_tok, prompt_ids, response_ids, policy_specials=None,
                        oracle_specials=None):
    """One rollout re-read by the oracle's tokenizer: -> (oracle ids, oracle prompt length, ``TokenMap`` from the
    oracle's response tokens to the policy's ``response_ids``).

    The oracle reads ``decode(prompt_ids)`` (the policy's prompt as text, its chat markup included) followed by the
    response's text without the policy's special tokens, plus the oracle's EOS when the response ended with the
    policy's EOS. Oracle tokens ending inside the prompt are its prompt; the others (a token straddling the
    boundary included) are its response tokens, scored and mapped by ``token_map.map_tokens`` (each oracle token's
    score split over the policy tokens overlapping its characters; EOS to EOS; totals preserved).
    ``MappingError`` if the texts cannot be aligned (e.g. the oracle's tokenizer normalises the text).
    """
    prompt_ids, response_ids = [int(i) for i in prompt_ids], [int(i) for i in response_ids]
    policy_specials = special_ids(policy_tok) if policy_specials is None else policy_specials
    oracle_specials = special_ids(oracle_tok) if oracle_specials is None else oracle_specials
    prompt_text = policy_tok.decode(prompt_ids)
    response_text, policy_tokens = _policy_response_tokens(policy_tok, response_ids, policy_specials)
    ended = bool(response_ids) and response_ids[-1] == policy_tok.eos_token_id
    text = prompt_text + response_text + (oracle_tok.eos_token if ended else "")
    enc = oracle_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    cut = len(prompt_text)
    prompt_len = sum(1 for _, end in offsets if end <= cut)
    if prompt_len < 1:
        raise MappingError("the oracle's tokens of the prompt are empty: its first response token has no context")
    if ended and ids[-1] != oracle_tok.eos_token_id:
        raise MappingError("the oracle's tokenizer did not read its EOS string as its EOS token")
    oracle_tokens = [(max(s - cut, 0), max(e - cut, 0), ids[t] in oracle_specials or (ended and t == len(ids) - 1))
                     for t, (s, e) in enumerate(offsets) if t >= prompt_len]
    oracle_response_text = text[cut:]
    tmap = map_tokens(oracle_response_text, oracle_tokens, response_text, policy_tokens)
    return ids, prompt_len, tmap


def map_rollout_rewards(tmap: TokenMap, oracle_rewards) -> torch.Tensor:
    """[n_oracle_response_tokens] oracle-token rewards -> [n_policy_response_tokens] fp32 policy-token rewards;
    each response's total is preserved (``TokenMap.apply``)."""
    return tmap.apply(torch.as_tensor(oracle_rewards))


# --------------------------------------------------------------------------------------------------- actors

def _device():
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def _action_span(action_mask_row, width):
    """(first, last + 1) absolute positions of a row's action tokens in ``sequences`` (OpenRLHF: action column j
    is the token at ``width - A + j``); ValueError if the actions are not one contiguous response."""
    cols = action_mask_row.nonzero().flatten()
    if len(cols) == 0:
        return None
    first, last = int(cols[0]), int(cols[-1])
    if len(cols) != last - first + 1:
        raise ValueError("dense rewards from a cross-tokenizer oracle need one contiguous response per row "
                         "(multi-turn action masks are not supported)")
    offset = width - action_mask_row.shape[0]
    return first + offset, last + 1 + offset


_ReferenceBase = ReferenceModelActor.__ray_actor_class__  # Ray forbids subclassing the remote class itself


class _TokenRMActor(_ReferenceBase):
    """The token RM as a reference-style actor: ``forward(sequences, action_mask, attention_mask)`` -> [B, A] fp32,
    column j the token RM's reward r of the token at ``sequences[:, T - A + j]`` (0 off the action mask)."""

    def init_model_from_pretrained(self, strategy, pretrain):
        self._setup_distributed(strategy)
        model, self.settings = load_token_rm(pretrain, strategy.args.ds.param_dtype,
                                             strategy.args.ds.attn_implementation,
                                             ds_config=strategy.get_ds_eval_config(offload=False))
        self.model = strategy.prepare(model)
        self.model.eval()

    @torch.no_grad()
    def forward(self, sequences, action_mask=None, attention_mask=None, **_):
        device = _device()
        # r at absolute position t is token t's own reward (read from the state that has seen it): no shift.
        r = token_rewards(self.model, sequences.to(device), attention_mask.to(device), self.settings["activation"])
        return (r[:, -action_mask.shape[1]:].cpu() * action_mask.float()).float()


class _CrossTokenizerOracleActor(_ReferenceBase):
    """Oracle and reference of another tokenizer than the policy's, in one actor. ``forward(sequences,
    action_mask, attention_mask)`` -> [B, A] fp32 on the policy's action columns: ``log pi_oracle - log pi_ref``
    computed on the oracle's tokens of each rollout's text and mapped onto the policy's tokens
    (``cross_tokenizer_map``); a row that cannot be mapped is all NaN (the maker counts it and gives it 0)."""

    def init_model_from_pretrained(self, strategy, oracle, ref, policy_tokenizer):
        from openrlhf.utils import get_tokenizer

        super().init_model_from_pretrained(strategy, ref)  # OpenRLHF's own load of an eval Actor
        self.ref_model = self.model
        self._setup_distributed = lambda strategy: None  # the process group is set up once
        super().init_model_from_pretrained(strategy, oracle)
        self.oracle_tok = get_tokenizer(oracle, None, "right", None)
        self.policy_tok = get_tokenizer(policy_tokenizer, None, "right", None)

    def _logps(self, model, sequences, action_mask, attention_mask):
        device = _device()
        return model(sequences.to(device), action_mask.to(device), attention_mask.to(device)).float().cpu()

    @torch.no_grad()
    def forward(self, sequences, action_mask=None, attention_mask=None, **_):
        return cross_tokenizer_forward(self.policy_tok, self.oracle_tok,
                                       lambda *a: self._logps(self.model, *a) - self._logps(self.ref_model, *a),
                                       sequences, action_mask, attention_mask)


def cross_tokenizer_forward(policy_tok, oracle_tok, log_ratio, sequences, action_mask, attention_mask):
    """The cross-tokenizer actor's forward with its models abstracted: ``log_ratio(seqs, action_mask, attention)``
    returns oracle-token [B', A'] ``log pi_oracle - log pi_ref`` for a right-padded oracle batch in OpenRLHF's
    layout. -> [B, A] fp32 mapped rewards (rows that cannot be mapped: NaN; rows without actions: 0)."""
    B, T = sequences.shape
    out = torch.zeros(action_mask.shape, dtype=torch.float32)
    pol_sp, orc_sp = special_ids(policy_tok), special_ids(oracle_tok)
    rows = []
    for i in range(B):
        span = _action_span(action_mask[i], T)
        if span is None:
            continue
        keep = attention_mask[i].bool()
        keep[span[0]:] = False
        prompt = sequences[i][keep].tolist()
        response = sequences[i, span[0]:span[1]].tolist()
        try:
            ids, prompt_len, tmap = cross_tokenizer_map(policy_tok, oracle_tok, prompt, response, pol_sp, orc_sp)
        except MappingError:
            out[i] = float("nan")
            continue
        rows.append((i, span, ids, prompt_len, tmap))
    if not rows:
        return out
    width = max(len(r[2]) for r in rows)
    pad = oracle_tok.pad_token_id if oracle_tok.pad_token_id is not None else 0
    seqs = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    amask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for k, (_, _, ids, prompt_len, _) in enumerate(rows):
        seqs[k, :len(ids)] = torch.tensor(ids)
        attn[k, :len(ids)] = 1
        amask[k, prompt_len - 1:len(ids) - 1] = True  # column j scores token j + 1 (OpenRLHF's layout)
    ratio = log_ratio(seqs, amask, attn)
    offset = T - action_mask.shape[1]
    for k, (i, span, ids, prompt_len, tmap) in enumerate(rows):
        scores = ratio[k, prompt_len - 1:len(ids) - 1]
        out[i, span[0] - offset:span[1] - offset] = map_rollout_rewards(tmap, scores)
    return out


TokenRMActor = ray.remote(num_gpus=1)(_TokenRMActor)
CrossTokenizerOracleActor = ray.remote(num_gpus=1)(_CrossTokenizerOracleActor)


# ---------------------------------------------------------------------------------------------- experience maker

class DenseExperienceMaker(RemoteExperienceMaker):
    """OpenRLHF's ``RemoteExperienceMaker`` with the dense reward of ``plan`` in the per-token reward of GAE /
    REINFORCE: ``R_t = compute_reward(seq_coef * r_seq, ...)_t + d_t`` (``shaped_rewards``).

    ``dense_groups``: ``{name: RayActorGroup}`` for ``plan.groups()``. With ``plan.source == "none"`` it is
    ``RemoteExperienceMaker`` unchanged. ``dense_sync``: run each dense forward to the end (and empty the cache)
    before the next model's, for dense groups sharing GPUs; default ``--train.colocate_all``.
    """

    def __init__(self, *args, plan: DensePlan, dense_groups: Optional[dict] = None, dense_sync=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.dense_groups = dict(dense_groups or {})
        self.dense_sync = self.args.train.colocate_all if dense_sync is None else dense_sync
        if plan.source == "none":
            return
        check_estimator(self.advantage_estimator)
        wanted = {name for name, _, _ in plan.groups()}
        if set(self.dense_groups) != wanted:
            raise ValueError(f"dense_groups must be {sorted(wanted)} for this plan, got {sorted(self.dense_groups)}")
        if plan.reuse_reference and self.initial_model_group is None:
            raise ValueError("plan.reuse_reference needs PPO's reference group (--algo.kl.init_coef > 0)")
        self._dense_refs, self._reference_refs, self._dense_by_mask = {}, None, {}

    # -- forwards: the dense groups are dispatched with the actor's forward (every make_experience has one), so
    # they run in parallel with actor, critic and reference, batched exactly like them; the reference group's
    # object refs are kept so that its log-probs can be read again after super().make_experience, which drops them
    # when the KL is not a loss.
    def _dispatch_forward(self, group, sync_condition, **kwargs):
        if self.plan.source != "none":
            if group is self.actor_model_group:
                batch = {k: kwargs[k] for k in ("sequences", "action_mask", "attention_mask")}
                self._dense_refs = {name: super(DenseExperienceMaker, self)._dispatch_forward(g, self.dense_sync,
                                                                                               **batch)
                                    for name, g in self.dense_groups.items()}
            ref = super()._dispatch_forward(group, sync_condition, **kwargs)
            if group is self.initial_model_group:
                self._reference_refs = ref
            return ref
        return super()._dispatch_forward(group, sync_condition, **kwargs)

    def _gather(self, group, refs):
        return self._flatten_results(refs, getattr(group, "duplicate_actors", 1))

    @torch.no_grad()
    def make_experience(self, samples_list):
        """OpenRLHF's ``make_experience``, then each experience's dense reward d [B, A] is computed from the dense
        groups' outputs and attached (``experience.dense_rewards``, consumed by ``compute_advantages_and_returns``),
        with ``dense_reward`` / ``dense_abs_mean`` (and ``dense_mapping_failed``) in ``experience.info``."""
        if self.plan.source == "none":
            return super().make_experience(samples_list)
        self._dense_refs, self._reference_refs = {}, None
        experiences = super().make_experience(samples_list)
        parts = {name: self._gather(self.dense_groups[name], refs) for name, refs in self._dense_refs.items()}
        if self.plan.reuse_reference:
            parts["dense_ref"] = self._gather(self.initial_model_group, self._reference_refs)
        self._dense_refs, self._reference_refs = {}, None
        for i, exp in enumerate(experiences):
            mask = exp.action_mask
            if self.plan.source == "token_rm":
                dense = token_rm_dense_rewards(parts["token_rm"][i], mask, self.plan.coef)
            elif self.plan.cross_tokenizer:
                ratio = parts["oracle"][i]
                failed = torch.isnan(ratio).all(dim=-1) & mask.any(dim=-1)
                exp.info["dense_mapping_failed"] = failed.float()
                dense = torch.nan_to_num(ratio, nan=0.0).float() * self.plan.coef * mask.float()
            else:
                dense = oracle_dense_rewards(parts["oracle"][i], parts["dense_ref"][i], mask, self.plan.coef)
            exp.dense_rewards = dense
            exp.info["dense_reward"] = dense.sum(dim=-1)
            exp.info["dense_abs_mean"] = masked_mean(dense.abs(), mask.float(), dim=-1)
        return experiences

    # -- advantages: OpenRLHF passes each experience's action_mask object unchanged from
    # compute_advantages_and_returns into get_advantages_and_returns / get_cumulative_returns, right after
    # compute_reward; keying the dense tensor by that object's identity adds d_t there without copying OpenRLHF's
    # loop. The stash lives for one call only (ids cannot be reused meanwhile: the experiences hold their masks).
    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        """``R_t = compute_reward(seq_coef * r_seq, ...)_t + d_t``, then OpenRLHF's GAE / reward-to-go. The sequence
        reward is scaled before OpenRLHF's length penalties and clip; ``info["return"]`` includes the dense sum;
        ``info["reward"]`` stays unscaled (penalties included)."""
        if self.plan.source == "none":
            return super().compute_advantages_and_returns(experiences)
        dense, raw = [], []
        for exp in experiences:
            d = getattr(exp, "dense_rewards", None)
            if d is None:
                raise RuntimeError("an experience has no dense_rewards: DenseExperienceMaker.make_experience attaches "
                                   "them (were the experiences re-split or re-made in between?)")
            dense.append(d)
            raw.append(exp.rewards.float())
            exp.rewards = raw[-1] * self.plan.seq_coef
        self._dense_by_mask = {id(exp.action_mask): d for exp, d in zip(experiences, dense)}
        try:
            experiences = super().compute_advantages_and_returns(experiences)
        finally:
            self._dense_by_mask = {}
        for exp, d, r in zip(experiences, dense, raw):
            exp.info["return"] = exp.info["return"] + d.sum(dim=-1)
            if "reward" in exp.info:  # OpenRLHF copied the scaled reward there: log it on the reward's own scale
                exp.info["reward"] = exp.info["reward"] + (1.0 - self.plan.seq_coef) * r
            del exp.dense_rewards  # not shipped to the actors with the experience
        return experiences

    def _with_dense(self, rewards, action_mask):
        if self.plan.source == "none":
            return rewards
        dense = self._dense_by_mask.get(id(action_mask))
        if dense is None:
            raise RuntimeError("no dense reward for this action_mask: get_advantages_and_returns / "
                               "get_cumulative_returns were called outside compute_advantages_and_returns")
        return add_dense(rewards, dense, action_mask)

    @torch.no_grad()
    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        """OpenRLHF's GAE on ``rewards + d`` (``d`` the dense reward of the experience owning ``action_mask``)."""
        return super().get_advantages_and_returns(values, self._with_dense(rewards, action_mask), action_mask,
                                                  gamma, lambd)

    @torch.no_grad()
    def get_cumulative_returns(self, rewards, action_mask, gamma):
        """OpenRLHF's reward-to-go on ``rewards + d``."""
        return super().get_cumulative_returns(self._with_dense(rewards, action_mask), action_mask, gamma)
