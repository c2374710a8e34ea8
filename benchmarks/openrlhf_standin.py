"""A stand-in for the few OpenRLHF 0.11.2 pieces that ``bench_gpu.py`` drives, for machines without OpenRLHF.

A lent GPU machine has torch and transformers but no OpenRLHF, DeepSpeed, Ray or vLLM, and no package registry.
``openrlhf_sepo.trainer`` and ``openrlhf_sepo.tkpo_trainer`` import OpenRLHF at import time (their trainers
subclass ``DPOTrainer`` and ``SFTTrainer``, ``TKPOActor`` subclasses ``Actor``), so to run *the package's* trainer
code there, ``standin_openrlhf()`` puts these copies under OpenRLHF's module names for the duration of a ``with``
block, imports the package's trainer modules against them, and then puts every module back as it was.

What is copied, line for line from OpenRLHF 0.11.2 (without the branches the benchmark never takes: sequence
packing, ring attention, VLMs, temperature, entropy, wandb/tensorboard):

- ``Actor.forward`` (openrlhf/models/actor.py): position ids from the attention mask, the HF model's forward,
  logits cast to fp32, ``log_probs_from_logits`` (openrlhf/models/utils.py, with its flash-attn Triton
  cross-entropy when that is importable and the chunked logsumexp otherwise), the last position dropped;
- ``DPOLoss`` and ``SFTLoss`` (token-level mean, one micro-batch, one rank) (openrlhf/models/loss.py);
- ``DPOTrainer.__init__`` (the attributes the hooks read), ``concatenated_forward``, ``concatenated_inputs``,
  ``_get_batch_logps`` (openrlhf/trainer/dpo_trainer.py); ``SFTTrainer.__init__`` (its attributes).

``tests/test_bench_gpu.py`` checks each against the installed OpenRLHF on the same inputs (equal outputs).
"""

import contextlib
import importlib
import sys
import types
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

OPENRLHF_VERSION = "0.11.2"  # the release these are copied from


def _logsumexp_by_chunk(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    seq_len = logits.shape[0]
    logsumexp_values = torch.zeros((seq_len), device=logits.device, dtype=logits.dtype)
    for s_idx in range(0, seq_len, chunk_size):
        end_idx = min(s_idx + chunk_size, seq_len)
        logsumexp_values[s_idx:end_idx] = torch.logsumexp(logits[s_idx:end_idx], dim=-1)
    return logsumexp_values


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dtype in [torch.float32, torch.float64]:
        batch_dim = logits.shape[:-1]
        last_dim = logits.shape[-1]
        try:
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

            output = cross_entropy_loss(logits.reshape(-1, last_dim), labels.reshape(-1))
            log_probs_labels = -output[0].view(*batch_dim)
        except ImportError:
            logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
            logsumexp_values = _logsumexp_by_chunk(logits.reshape(-1, last_dim))
            logsumexp_values = logsumexp_values.view(*batch_dim)
            log_probs_labels = logits_labels - logsumexp_values
    else:
        log_probs_labels = []
        for row_logits, row_labels in zip(logits, labels):
            row_log_probs = F.log_softmax(row_logits, dim=-1)
            log_probs_labels.append(row_log_probs.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
        log_probs_labels = torch.stack(log_probs_labels)
    return log_probs_labels


def masked_mean(tensor: torch.Tensor, mask: Optional[torch.Tensor], dim: int = None) -> torch.Tensor:
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


class Actor(nn.Module):
    """OpenRLHF's ``Actor`` around an already built HF causal LM (``pretrain_or_model`` must be a module)."""

    def __init__(self, pretrain_or_model, *args, packing_samples=False, **kwargs) -> None:
        super().__init__()
        if isinstance(pretrain_or_model, str):
            raise ValueError("the stand-in Actor wraps a built model; it loads no checkpoint")
        self.temperature = 1.0
        self.model = pretrain_or_model
        self.packing_samples = packing_samples

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False, allgather_logits=False,
                return_logprobs=False, ring_attn_group=None, packed_seq_lens=None, return_entropy=False, **mm_inputs):
        if self.packing_samples or return_entropy or mm_inputs:
            raise NotImplementedError("the stand-in Actor covers the unpacked text-only forward")
        rolled_sequences = torch.roll(sequences, shifts=-1, dims=1)
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        output = self.model(sequences, attention_mask=attention_mask, position_ids=position_ids)
        output["logits"] = output["logits"].to(torch.float32)
        if action_mask is None and not return_logprobs:
            assert return_output
            return output
        log_probs = log_probs_from_logits(output["logits"], rolled_sequences)[:, :-1]
        if action_mask is None:
            return (log_probs, output) if return_output else log_probs
        action_log_probs = log_probs[:, -action_mask.shape[1] :] * action_mask.float()
        return (action_log_probs, output) if return_output else action_log_probs


class DPOLoss(nn.Module):
    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
        super().__init__()
        self.beta, self.label_smoothing, self.ipo = beta, label_smoothing, ipo

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
        if self.ipo:
            losses = (logits - 1 / (2 * self.beta)) ** 2
        else:
            losses = (-F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
                      - F.logsigmoid(-self.beta * logits) * self.label_smoothing)
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return losses.mean(), chosen_rewards, rejected_rewards


class SFTLoss(nn.Module):
    """Token-level mean of -log p over the loss mask (``aggregate_loss`` without global normalisers)."""

    def __init__(self, token_level_loss: bool = True):
        super().__init__()
        if not token_level_loss:
            raise NotImplementedError("the stand-in SFTLoss is the token-level one")

    def forward(self, per_token_logps, loss_mask, **loss_batch_info) -> torch.Tensor:
        if loss_batch_info:
            raise NotImplementedError("the stand-in SFTLoss has no global normalisers")
        return masked_mean(-per_token_logps, loss_mask, dim=None)


class DPOTrainer:
    """``DPOTrainer``'s attributes and forward hooks; no ``fit`` (``bench_gpu.preference_step`` is its loop body)."""

    def __init__(self, model, ref_model, strategy, tokenizer, optim, train_dataloader, eval_dataloader, scheduler,
                 max_norm=0.5, beta=0.01, max_epochs: int = 2, save_hf_ckpt: bool = False,
                 disable_ds_ckpt: bool = False) -> None:
        self.strategy, self.epochs, self.max_norm, self.model = strategy, max_epochs, max_norm, model
        self.train_dataloader, self.eval_dataloader, self.ref_model = train_dataloader, eval_dataloader, ref_model
        self.scheduler, self.optimizer, self.tokenizer, self.args = scheduler, optim, tokenizer, strategy.args
        self.save_hf_ckpt, self.disable_ds_ckpt = save_hf_ckpt, disable_ds_ckpt
        self.beta = beta
        self.loss_fn = DPOLoss(self.beta, self.args.model.label_smoothing, self.args.model.ipo_enable)
        self.aux_loss = self.args.model.aux_loss_coef > 1e-8
        self.nll_loss = self.args.model.nll_loss_coef > 1e-8
        self.packing_samples = strategy.args.ds.packing_samples

    def concatenated_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens):
        input_ids, att_masks, prompt_id_lens = self.concatenated_inputs(
            chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens
        )
        log_probs, output = model(input_ids, attention_mask=att_masks, return_output=True, return_logprobs=True,
                                  ring_attn_group=self.strategy.ring_attn_group)
        all_logps_sum, all_logps_mean = self._get_batch_logps(log_probs, att_masks, prompt_id_lens)
        chosen_logps = all_logps_sum[: chosen_ids.shape[0]]
        rejected_logps = all_logps_sum[chosen_ids.shape[0] :]
        aux_loss = output.aux_loss if "aux_loss" in output else []
        return chosen_logps, rejected_logps, aux_loss, -all_logps_mean[: chosen_ids.shape[0]].mean()

    def concatenated_inputs(self, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens):
        def pad_to_length(tensor, length, pad_value, dim=-1):
            if tensor.size(dim) >= length:
                return tensor
            pad_size = list(tensor.shape)
            pad_size[dim] = length - tensor.size(dim)
            return torch.cat([tensor, pad_value * torch.ones(*pad_size, dtype=tensor.dtype, device=tensor.device)],
                             dim=dim)

        max_length = max(chosen_ids.shape[1], reject_ids.shape[1])
        inputs_ids = torch.cat((pad_to_length(chosen_ids, max_length, self.tokenizer.pad_token_id),
                                pad_to_length(reject_ids, max_length, self.tokenizer.pad_token_id)), dim=0)
        max_length = max(c_mask.shape[1], r_mask.shape[1])
        att_masks = torch.cat((pad_to_length(c_mask, max_length, 0), pad_to_length(r_mask, max_length, 0)), dim=0)
        return inputs_ids, att_masks, prompt_id_lens * 2

    def _get_batch_logps(self, per_token_logps, attention_mask, prompt_id_lens):
        loss_masks = attention_mask.clone().bool()
        for mask, source_len in zip(loss_masks, prompt_id_lens):
            mask[:source_len] = False
        loss_masks = loss_masks[:, 1:]
        logprobs_sums = (per_token_logps * loss_masks).sum(-1)
        logprobs_means = (per_token_logps * loss_masks).sum(-1) / loss_masks.sum(-1)
        return logprobs_sums, logprobs_means


class SFTTrainer:
    """``SFTTrainer``'s attributes; no ``fit`` (``bench_gpu.sft_step`` is its loop body)."""

    def __init__(self, model, strategy, optim, train_dataloader, eval_dataloader, scheduler, max_norm: float = 1,
                 pretrain_mode: bool = False, batch_size: int = 1, max_epochs: int = 2, tokenizer=None,
                 save_hf_ckpt: bool = False, disable_ds_ckpt: bool = False) -> None:
        self.strategy, self.epochs, self.batch_size, self.max_norm = strategy, max_epochs, batch_size, max_norm
        self.train_dataloader, self.eval_dataloader, self.scheduler = train_dataloader, eval_dataloader, scheduler
        self.pretrain_mode, self.model, self.tokenizer, self.optimizer = pretrain_mode, model, tokenizer, optim
        self.args = strategy.args
        self.save_hf_ckpt, self.disable_ds_ckpt = save_hf_ckpt, disable_ds_ckpt
        self.loss_fn = SFTLoss()
        self.aux_loss = self.args.model.aux_loss_coef > 1e-8
        self.packing_samples = strategy.args.ds.packing_samples


def _modules():
    """{module name: module} for the names the package's trainer modules import."""
    made = {name: types.ModuleType(name) for name in
            ("openrlhf", "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.dpo_trainer",
             "openrlhf.trainer.sft_trainer")}
    made["openrlhf"].__version__ = OPENRLHF_VERSION + "+bench-standin"
    made["openrlhf"].models, made["openrlhf"].trainer = made["openrlhf.models"], made["openrlhf.trainer"]
    made["openrlhf.models"].Actor, made["openrlhf.models"].SFTLoss = Actor, SFTLoss
    made["openrlhf.models"].DPOLoss = DPOLoss
    made["openrlhf.trainer"].dpo_trainer = made["openrlhf.trainer.dpo_trainer"]
    made["openrlhf.trainer"].sft_trainer = made["openrlhf.trainer.sft_trainer"]
    made["openrlhf.trainer.dpo_trainer"].DPOTrainer = DPOTrainer
    made["openrlhf.trainer.sft_trainer"].SFTTrainer = SFTTrainer
    return made


PACKAGE_MODULES = ("openrlhf_sepo.trainer", "openrlhf_sepo.tkpo_trainer")


@contextlib.contextmanager
def standin_openrlhf():
    """Inside the block, ``openrlhf`` is these stand-ins and the yielded namespace holds ``SelectiveDPOTrainer``,
    ``TKPOActor``, ``TKPOTrainer`` (the package's code, imported against the stand-ins), ``Actor``, ``DPOTrainer``,
    ``SFTTrainer``. On exit every ``sys.modules`` entry and package attribute touched is restored."""
    import openrlhf_sepo

    touched = [k for k in sys.modules if k == "openrlhf" or k.startswith("openrlhf.")] + list(PACKAGE_MODULES)
    saved = {k: sys.modules[k] for k in touched if k in sys.modules}
    saved_attrs = {k: getattr(openrlhf_sepo, k.split(".")[1], None) for k in PACKAGE_MODULES}
    for k in touched:
        sys.modules.pop(k, None)
    sys.modules.update(_modules())
    try:
        trainer, tkpo_trainer = (importlib.import_module(k) for k in PACKAGE_MODULES)
        yield types.SimpleNamespace(SelectiveDPOTrainer=trainer.SelectiveDPOTrainer, TKPOActor=tkpo_trainer.TKPOActor,
                                    TKPOTrainer=tkpo_trainer.TKPOTrainer, Actor=Actor, DPOTrainer=DPOTrainer,
                                    SFTTrainer=SFTTrainer, openrlhf="stand-in (OpenRLHF 0.11.2's code, see "
                                    "benchmarks/openrlhf_standin.py)")
    finally:
        for k in [k for k in sys.modules if k == "openrlhf" or k.startswith("openrlhf.")] + list(PACKAGE_MODULES):
            sys.modules.pop(k, None)
        sys.modules.update(saved)
        for k, value in saved_attrs.items():
            name = k.split(".")[1]
            if value is None:
                openrlhf_sepo.__dict__.pop(name, None)
            else:
                setattr(openrlhf_sepo, name, value)
