"""Every place this package relies on OpenRLHF beyond its public calls: the upgrade checklist.

Read from OpenRLHF ``OPENRLHF_VERSION`` (0.11.2). Each touch point is one function or constant here, and its
docstring's first lines say what it relies on, the version it was read from, and what breaks if that changes.
Before moving to another OpenRLHF release, read each entry against the new source, then run
``tests/test_openrlhf_internals.py`` (it checks every hook in ``HOOKS`` still has the names and arguments we call),
``tests/test_cpu_runtime.py`` and one end-to-end run per method.

The touch points:

- data sets: ``dpo_texts`` and ``dpo_ids`` (``RewardDataset(is_dpo=True)``'s strings and ids, batched),
  ``set_single_sft_row`` (``SFTDataset``'s row lists); and
  ``rows.NoRows``, ``rows.DataStrategy``, listed in ``LISTED_ELSEWHERE``;
- models: ``engine_module`` (DeepSpeed's engine wrapper); in ``LISTED_ELSEWHERE``: SePO's selected-positions forward,
  the token RM's per-position forward, and the fp32 loads of the reward and token reward models;
- trainers: ``HOOKS`` (the overridden and called hooks of ``DPOTrainer``, ``RewardModelTrainer``, ``SFTTrainer``,
  ``Actor``, the critic model), ``show_step_logs`` (the progress bar), ``wandb_run`` / ``tensorboard_writer`` /
  ``log_eval_metrics`` (the trainers' private loggers), ``uneven_all_gather`` (the strategy's ``all_gather``);
- flags: ``add_missing_flags`` with ``DPO_LOSS_FLAGS``, ``PAIRWISE_RM_FLAGS``, ``NO_PACKING_FLAGS``;
- the CPU runtime: ``patch_strategy_for_cpu`` (``DeepspeedStrategy``'s CUDA calls), and the flash-attn kernel
  placeholder, listed in ``LISTED_ELSEWHERE``;
- OpenRLHF's Ray PPO (``train_ppo_dense``): ``extra_flags_on_first_parse`` (train_ppo_ray's parser),
  ``ppo_trainer_class`` and ``ray_actor_class`` (its trainer, subclassed), ``ray_init_with`` (its ``ray.init``),
  ``patch_torch_cuda_for_cpu_worker`` with ``WORKER_CUDA_CALLS`` (the Ray actors' CUDA calls, the replay buffer's
  device), ``PPO_HOOKS`` (the signatures those rely on); in ``LISTED_ELSEWHERE``: the vLLM stand-in (the engine
  interface OpenRLHF calls) and the dense trainer.
"""

import contextlib
import functools
import os

import torch

OPENRLHF_VERSION = "0.11.2"


# --- data sets ---------------------------------------------------------------------------------------------------

def dpo_texts(dataset, row) -> tuple:
    """``(prompt, chosen, reject)``: the strings ``RewardDataset(is_dpo=True).process_data`` makes of ``row`` (input
    template or chat template applied, the prompt cut off the responses), before it tokenizes anything.

    Relies on: ``process_data`` getting them from the module function ``preprocess_data(data, input_template,
    prompt_key, chosen_key, rejected_key, apply_chat_template, is_dpo)`` with the dataset's attributes of those names.
    Read from 0.11.2 (openrlhf/datasets/reward_dataset.py). Breaks if: ``preprocess_data`` is renamed or takes other
    arguments (ImportError / TypeError), or ``process_data`` builds its strings another way (the row tokenizers'
    ids would drift from the trainer's: ``tests/test_row_ids.py`` compares them with ``RewardDataset``'s own).
    """
    from openrlhf.datasets.reward_dataset import preprocess_data

    prompt, chosen, reject, _ = preprocess_data(row, dataset.input_template, dataset.prompt_key, dataset.chosen_key,
                                                dataset.rejected_key, dataset.apply_chat_template, dataset.is_dpo)
    return prompt, chosen, reject


def dpo_ids(dataset, texts) -> list:
    """``RewardDataset(is_dpo=True)``'s ids for rows already made strings by ``dpo_texts``, the tokenizer called on all
    the rows at once (2 calls, not 3 per row): -> per ``(prompt, chosen, reject)``, ``(prompt_len, chosen_ids,
    rejected_ids)``, both ids ``None`` where ``process_data`` drops the row.

    Relies on, read from 0.11.2 (openrlhf/datasets/reward_dataset.py): ``process_data`` measuring the prompt alone
    (tokenized with truncation at ``max_length``, no special tokens) and dropping the row when that length is
    ``>= max_length - 2``; ``__getitem__`` tokenizing ``(prompt + response).rstrip("\\n")``, with ``" " + eos_token``
    appended unless it already ends with it, truncated at ``max_length``, no special tokens, then forcing the last id
    to ``eos_token_id``. A fast tokenizer gives one text the same ids alone or in a batch. Breaks if: any of these
    rules changes (the ids would drift from the trainer's: ``tests/test_row_ids.py`` compares them with
    ``RewardDataset``'s own on rows of every shape).
    """
    if not texts:
        return []
    tok, eos = dataset.tokenizer, dataset.tokenizer.eos_token
    kwargs = dict(max_length=dataset.max_length, padding=False, truncation=True, add_special_tokens=False)
    prompt_lens = [len(ids) for ids in tok([t[0] for t in texts], **kwargs)["input_ids"]]
    kept = [i for i, n in enumerate(prompt_lens) if n < dataset.max_length - 2]

    def sequence(prompt, response):
        text = (prompt + response).rstrip("\n")
        return text if text.endswith(eos) else text + " " + eos

    seqs = [sequence(texts[i][0], texts[i][k]) for i in kept for k in (1, 2)]
    seqs = tok(seqs, **kwargs)["input_ids"] if seqs else []  # (a tokenizer fails on an empty list)
    out = [(n, None, None) for n in prompt_lens]
    for j, i in enumerate(kept):
        chosen_ids, rejected_ids = seqs[2 * j], seqs[2 * j + 1]
        chosen_ids[-1] = rejected_ids[-1] = tok.eos_token_id  # __getitem__: "to avoid EOS_token truncation"
        out[i] = (prompt_lens[i], chosen_ids, rejected_ids)
    return out


def set_single_sft_row(dataset, prompt, response, prompt_ids_len) -> None:
    """Make ``dataset`` (an ``SFTDataset``) hold the one processed row given, so ``dataset[0]`` tokenizes it.

    Relies on: ``SFTDataset.__getitem__`` (and its ``get_loss_mask``) reading ``self.prompts/responses/prompt_ids_lens[idx]`` (filled from
    ``process_data``'s ``prompt/response/prompt_ids_len``). Read from 0.11.2 (openrlhf/datasets/sft_dataset.py).
    Breaks if: those attributes are renamed or re-laid out (the TKPO row tokenizer would fail or read stale rows).
    """
    dataset.prompts, dataset.responses, dataset.prompt_ids_lens = [prompt], [response], [prompt_ids_len]


# --- trainers ----------------------------------------------------------------------------------------------------

def engine_module(model):
    """The module a DeepSpeed engine wraps (``engine.module``), or ``model`` itself when it is not wrapped.

    Relies on: ``strategy.prepare`` returning DeepSpeed engines (``Actor.model`` becomes one; a critic model is
    one itself) whose ``module`` is the HF model; ``engine.eval()`` sets ``module.training``. Read from 0.11.2
    (openrlhf/utils/deepspeed/deepspeed.py ``prepare``/``_ds_init_train_model``). Breaks if: the engine stops
    wrapping (the lookups fall back to ``model``, still right) or wraps twice (the LM head / value head lookups
    of SePO's selected forward and the token RM miss their attributes).
    """
    return getattr(model, "module", model)


def show_step_logs(step_bar, logs_dict, extra) -> dict:
    """OpenRLHF's step logs with ``extra`` (a method's own metrics) added, shown on the progress bar.

    Relies on: each trainer's ``fit`` calling ``step_bar.set_postfix(logs_dict)`` with its own logs, then
    ``save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)`` at the end of an
    accumulation window; a postfix set there replaces fit's until the next micro-batch. Read from 0.11.2
    (dpo_trainer.py, rm_trainer.py, sft_trainer.py ``fit``). Breaks if: the hook loses ``step_bar`` (TypeError)
    or fit sets its postfix after the hook (the method's metrics vanish from the console only).
    """
    logs_dict = {**(logs_dict or {}), **extra}
    step_bar.set_postfix(logs_dict)
    return logs_dict


def wandb_run(trainer):
    """The trainer's wandb module (set up and logged to by OpenRLHF), or None when wandb is off.

    Relies on: ``SFTTrainer`` / ``DPOTrainer`` / ``RewardModelTrainer.__init__`` storing ``wandb`` (after
    ``wandb.init``) in ``self._wandb``, None without ``--logger.wandb.key``. Read from 0.11.2. Breaks if: renamed
    (AttributeError at the first evaluation; tests/test_openrlhf_internals.py checks the name in ``__init__``).
    """
    return trainer._wandb


def tensorboard_writer(trainer):
    """The trainer's TensorBoard ``SummaryWriter`` (rank 0, without wandb), or None.

    Relies on: the same trainers storing it in ``self._tensorboard`` (``--logger.tensorboard_dir``, only when
    ``_wandb`` is None). Read from 0.11.2. Breaks if: renamed (AttributeError at the first evaluation without
    wandb; tests/test_openrlhf_internals.py checks the name in ``__init__``).
    """
    return trainer._tensorboard


def log_eval_metrics(trainer, metrics: dict, steps: int) -> None:
    """Log ``metrics`` as ``eval/<name>`` at ``steps`` where OpenRLHF's ``evaluate`` logs its own: wandb (with
    ``eval/global_step``), else TensorBoard; rank 0 only. Relies on ``wandb_run``, ``tensorboard_writer`` and the
    strategy's ``is_rank_0``. Read from 0.11.2 (``evaluate`` of the three trainers). Breaks if: as those two."""
    if not trainer.strategy.is_rank_0():
        return
    wandb, tensorboard = wandb_run(trainer), tensorboard_writer(trainer)
    if wandb is not None:
        wandb.log({**{f"eval/{k}": v for k, v in metrics.items()}, "eval/global_step": steps})
    elif tensorboard is not None:
        for k, v in metrics.items():
            tensorboard.add_scalar(f"eval/{k}", v, steps)


def _gather_uneven(gather, data: torch.Tensor) -> torch.Tensor:
    """``gather`` (a strategy's equal-size ``all_gather``, concatenating) for 1-D tensors of any size per rank."""
    sizes = gather(torch.tensor([float(data.numel())], device=data.device)).long().tolist()
    padded = torch.cat([data, data.new_zeros(max(sizes) - data.numel())])
    chunks = gather(padded).split(max(sizes))
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])


@contextlib.contextmanager
def uneven_all_gather(strategy):
    """Within the block, ``strategy.all_gather`` accepts 1-D tensors of a different size on every rank.

    Relies on: ``DeepspeedStrategy.all_gather(tensor)`` concatenating equal-size tensors of all ranks (it
    ``dist.all_gather``s into ``zeros_like`` buffers), and ``RewardModelTrainer.evaluate`` gathering its rewards
    through ``self.strategy.all_gather``. The instance attribute shadows the class's method and is deleted after.
    Read from 0.11.2 (deepspeed.py ``all_gather``, rm_trainer.py ``evaluate``). Breaks if: ``all_gather`` gathers
    differently (sizes or order would be wrong) or evaluate gathers elsewhere (token RM eval with uneven lists
    per rank would hang or raise in ``dist.all_gather``).
    """
    gather = strategy.all_gather
    strategy.all_gather = lambda data: _gather_uneven(gather, data)
    try:
        yield
    finally:
        del strategy.all_gather  # back to the class's method


# The hooks the trainers override or call, and the arguments they rely on (checked by tests/test_openrlhf_internals.py
# against the installed OpenRLHF): (module, attribute path, leading parameter names, who relies on it). Read from 0.11.2.
# Breaks if: a name or the leading arguments change (the override is no longer called, or is called wrongly).
HOOKS = (
    ("openrlhf.trainer.dpo_trainer", "DPOTrainer.concatenated_forward",
     ("self", "model", "chosen_ids", "c_mask", "reject_ids", "r_mask", "prompt_id_lens"), "trainer.py"),
    ("openrlhf.trainer.dpo_trainer", "DPOTrainer.concatenated_inputs",
     ("self", "chosen_ids", "c_mask", "reject_ids", "r_mask", "prompt_id_lens"), "trainer.py"),
    ("openrlhf.trainer.dpo_trainer", "DPOTrainer._get_batch_logps",
     ("self", "per_token_logps", "attention_mask", "prompt_id_lens"), "trainer.py (returns (sum, mean))"),
    ("openrlhf.trainer.dpo_trainer", "DPOTrainer.save_logs_and_checkpoints",
     ("self", "args", "global_step", "step_bar", "logs_dict", "client_states"), "trainer.py"),
    ("openrlhf.trainer.rm_trainer", "RewardModelTrainer.concatenated_forward",
     ("self", "model", "chosen_ids", "c_mask", "reject_ids", "r_mask"), "token_rm_trainer.py"),
    ("openrlhf.trainer.rm_trainer", "RewardModelTrainer.evaluate", ("self", "eval_dataloader", "steps"),
     "token_rm_trainer.py"),
    ("openrlhf.trainer.rm_trainer", "RewardModelTrainer.save_logs_and_checkpoints",
     ("self", "args", "global_step", "step_bar", "logs_dict", "client_states"), "token_rm_trainer.py"),
    ("openrlhf.trainer.sft_trainer", "SFTTrainer.evaluate", ("self", "eval_dataloader", "steps"), "wmle"),
    ("openrlhf.trainer.sft_trainer", "SFTTrainer.save_logs_and_checkpoints",
     ("self", "args", "global_step", "step_bar", "logs_dict", "client_states"), "tkpo_trainer.py, wmle"),
    ("openrlhf.models.loss", "SFTLoss.forward", ("self", "per_token_logps", "loss_mask"),
     "tkpo_trainer.py, wmle (SFTTrainer calls loss_fn(per_token_log_probs, loss_mask, **loss_batch_info))"),
    ("openrlhf.models.actor", "Actor.forward",
     ("self", "sequences", "action_mask", "attention_mask", "return_output"), "tkpo_trainer.TKPOActor"),
    ("openrlhf.datasets.reward_dataset", "preprocess_data",
     ("data", "input_template", "prompt_key", "chosen_key", "rejected_key", "apply_chat_template", "is_dpo"), "dpo_texts"),
    ("openrlhf.datasets.reward_dataset", "RewardDataset.process_data", ("self", "data"), "dpo_texts, dpo_ids"),
    ("openrlhf.datasets.sft_dataset", "SFTDataset.process_data", ("self", "data"), "set_single_sft_row callers"),
    ("openrlhf.utils.deepspeed.deepspeed", "DeepspeedStrategy.all_gather", ("self", "data"), "uneven_all_gather"),
)

# Touch points whose code lives elsewhere, with their contract. Read from 0.11.2.
LISTED_ELSEWHERE = {
    "openrlhf_sepo.rows.NoRows": (
        "an empty stand-in for the `datasets.Dataset` that RewardDataset / SFTDataset.__init__ map and filter "
        "(`column_names`, `map`, `filter`, `[column]`), so a row tokenizer gets their tokenizer state without rows. "
        "Breaks if __init__ calls anything else on its dataset (AttributeError when a row tokenizer is built)."),
    "openrlhf_sepo._flash_attn.install_placeholder": (
        "OpenRLHF imports flash_attn.bert_padding at import time (openrlhf/models/ring_attn_utils.py), whose package "
        "imports the CUDA kernel module flash_attn_2_cuda. Breaks if that import moves or goes (the placeholder is "
        "then unused: harmless) or other kernels are imported (ImportError on CPU machines)."),
    "openrlhf_sepo.trainer.SelectiveDPOTrainer._selected_forward": (
        "Actor.model is the DeepSpeed engine of an HF causal LM accepting `output_hidden_states` and "
        "`logits_to_keep`; position ids built as Actor.forward builds them (attention cumsum - 1, padding 1). "
        "Breaks if Actor.forward builds position ids differently (tested: both paths give the same log-probs). "
        "It also hands DPOTrainer.concatenated_forward a function in the model's place, relying on it calling "
        "`model(input_ids, attention_mask=..., **kwargs)` once for `(per-token log-probs [2B, T-1], output)` and "
        "reading the NLL from the chosen rows' `_get_batch_logps` mean (log-probs are computed only at the "
        "positions that mean and SePOLoss read). Breaks if it calls the model otherwise (TypeError) or reads other "
        "positions (tested: the NLL, loss and gradients equal the full path's)."),
    "openrlhf_sepo.evaluation.load_reward_model": (
        "get_llm_for_sequence_regression passes extra kwargs on to from_pretrained, where `dtype` outranks the "
        "`torch_dtype` OpenRLHF sets from param_dtype (bf16/fp16 only): fp32 reward models on CPU. Breaks if OpenRLHF "
        "stops forwarding kwargs (TypeError) or sets `dtype` itself (the model loads in bf16)."),
    "openrlhf_sepo.token_rm.load_token_rm": (
        "get_llm_for_sequence_regression(path, 'critic', param_dtype=...) loads in bf16 or fp16 only; fp32 is the "
        "bf16 load upcast. Breaks if OpenRLHF's param_dtype handling changes (scores in another precision)."),
    "openrlhf_sepo.token_rm.token_rewards": (
        "the critic model from get_llm_for_sequence_regression(..., 'critic') returns its backbone output (with "
        "'last_hidden_state') when called without action_mask, and names its head `value_head_prefix`."),
    "openrlhf_sepo.vllm_standin.install_if_missing": (
        "the vLLM interface OpenRLHF's Ray PPO calls (the module docstring's table: vllm_engine.py's RolloutRayActor "
        "and create_vllm_engines, samples_generator.py's SamplingParams, distributed_util.py's weight-sync group, "
        "the agent executors' RequestOutput fields). Breaks if OpenRLHF calls more of vLLM (AttributeError in a "
        "rollout actor: tests/test_openrlhf_internals.py checks every `self.llm.*` / `vllm.*` name it uses) or reads "
        "other fields of the outputs."),
    "openrlhf_sepo.ppo_dense_trainer.DensePPOTrainer": (
        "BasePPOTrainer.__init__ setting self.experience_maker (a RemoteExperienceMaker built from the actor, critic, "
        "reward and reference groups, self.kl_ctl, self.strategy, self.tokenizer, in that order) and fit() being the "
        "training loop train() calls; RayActorGroup(num_nodes, num_gpus_per_node, actor_class, pg, "
        "num_gpus_per_actor, duplicate_actors) and its async_init_model_from_pretrained(strategy, *args). Breaks if "
        "the maker is built or used elsewhere (dense rewards silently absent: the end-to-end test reads "
        "dense_reward in the step logs) or those signatures change (PPO_HOOKS)."),
    "openrlhf_sepo.rows.DataStrategy": (
        "the slice of DeepspeedStrategy that blending_datasets and RewardDataset read: args.data, args.use_ms, "
        "print, is_rank_0. Breaks if they read more of the strategy (AttributeError when scoring/evaluating)."),
}


# --- flags -------------------------------------------------------------------------------------------------------

# DPOTrainer.__init__ builds a DPOLoss from strategy.args.model.label_smoothing / ipo_enable (train_sepo replaces it).
DPO_LOSS_FLAGS = {"label_smoothing": 0.0, "ipo_enable": False}
# RewardModelTrainer.__init__ / fit read strategy.args.model.margin_loss_enable / compute_fp32_loss_enable.
PAIRWISE_RM_FLAGS = {"margin_loss_enable": False, "compute_fp32_loss_enable": False}
# SFTTrainer / RewardModelTrainer / DeepspeedStrategy / Actor read these --ds.* flags; entrypoints without packing
# or ring attention offer none of them.
NO_PACKING_FLAGS = {"packing_samples": False, "ring_attn_size": 1, "ring_attn_head_stride": 1}


def add_missing_flags(namespace, flags: dict, overwrite: bool = False) -> None:
    """Give ``namespace`` (a group of the nested args, e.g. ``args.model``) each of ``flags`` it lacks (all of them
    with ``overwrite``), so OpenRLHF code that reads flags our entrypoints do not offer reads neutral values.

    Relies on: OpenRLHF reading those flags as attributes of ``strategy.args.<group>`` (``DPO_LOSS_FLAGS``,
    ``PAIRWISE_RM_FLAGS``: ``args.model``; ``NO_PACKING_FLAGS``: ``args.ds``). Read from 0.11.2 (dpo_trainer.py,
    rm_trainer.py, sft_trainer.py ``__init__``, deepspeed.py ``__init__``). Breaks if: OpenRLHF reads a new flag
    there (AttributeError when the trainer or strategy is built: add it to the constant).
    """
    for name, neutral in flags.items():
        if overwrite or not hasattr(namespace, name):
            setattr(namespace, name, neutral)


# --- the CPU runtime ---------------------------------------------------------------------------------------------

_PATCHED_FLAG = "_openrlhf_sepo_cpu_patched"
# DeepspeedStrategy methods that call torch.cuda.* directly or through torch_dist_barrier_and_cuda_sync.
CUDA_METHODS = ("setup_distributed", "all_reduce", "all_gather", "save_model", "save_ckpt")


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Within the block, the three torch.cuda calls OpenRLHF makes mean 'the CPU'.

    Each of them would raise 'Torch not compiled with CUDA enabled' here, so giving them a CPU
    meaning cannot change a run that would otherwise have worked.
    """
    saved = (torch.cuda.set_device, torch.cuda.current_device, torch.cuda.synchronize)
    torch.cuda.set_device = lambda device=None: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.set_device, torch.cuda.current_device, torch.cuda.synchronize = saved


def _on_cpu(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with cuda_calls_on_cpu():
            return method(*args, **kwargs)

    return wrapper


def _cpu_device_mesh(init_device_mesh):
    @functools.wraps(init_device_mesh)
    def wrapper(device_type, *args, **kwargs):
        return init_device_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    return wrapper


def patch_strategy_for_cpu() -> bool:
    """Patch ``DeepspeedStrategy``'s CUDA-only spots for a CUDA-less machine (see ``openrlhf_sepo.cpu``). Idempotent.

    Relies on: ``CUDA_METHODS`` being the only ``DeepspeedStrategy`` methods that call ``torch.cuda.set_device``,
    ``current_device`` or ``synchronize``, and ``setup_distributed`` calling the module-level ``init_device_mesh("cuda",
    ...)`` of openrlhf/utils/deepspeed/deepspeed.py. Read from 0.11.2. Breaks if: another method calls torch.cuda
    (CPU runs fail with 'Torch not compiled with CUDA enabled' there: add it to ``CUDA_METHODS``) or the mesh is
    made elsewhere (CPU runs fail in ``setup_distributed``). Returns True if the patches are active, False on a CUDA
    machine (where nothing is touched).
    """
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import openrlhf_sepo  # noqa: F401  (flash-attn kernel placeholder, before OpenRLHF imports it)
    from openrlhf.utils.deepspeed import deepspeed as ds_module

    strategy_cls = ds_module.DeepspeedStrategy
    if getattr(strategy_cls, _PATCHED_FLAG, False):
        return True
    for name in CUDA_METHODS:
        setattr(strategy_cls, name, _on_cpu(getattr(strategy_cls, name)))
    ds_module.init_device_mesh = _cpu_device_mesh(ds_module.init_device_mesh)
    setattr(strategy_cls, _PATCHED_FLAG, True)
    return True


# --- OpenRLHF's Ray PPO (train_ppo_ray) on a machine without CUDA --------------------------------------------------

# The torch.cuda calls OpenRLHF's Ray PPO actors make outside DeepspeedStrategy (ppo_actor.py, ppo_critic.py,
# launcher.py, distributed_util.py, replay_buffer.py), and their CPU meaning. torch.cuda.empty_cache is already a
# no-op without CUDA; get_device_properties is reached only through CUDA IPC, which the CPU runtime refuses.
WORKER_CUDA_CALLS = {
    "set_device": lambda device=None: None,  # there is no device to select
    "current_device": lambda: "cpu",  # used as a device for .to() / torch.zeros(device=...)
    "synchronize": lambda device=None: None,  # CPU ops are synchronous
    "current_stream": lambda device=None: None,  # passed as `stream=` to the weight-sync broadcast, which ignores it
}


def patch_torch_cuda_for_cpu_worker() -> bool:
    """Give ``WORKER_CUDA_CALLS`` their CPU meaning in this whole process, and keep the PPO replay buffers on the CPU.
    For the Ray worker processes of a CPU run only (each serves this one job); idempotent; does nothing (False) when
    CUDA is available.

    Relies on: OpenRLHF's Ray actors calling only these torch.cuda functions (plus ``empty_cache``), each of which
    raises 'Torch not compiled with CUDA enabled' on a CPU build, so the patch cannot change a run that worked; and
    ``NaiveReplayBuffer.__init__`` reading ``torch.cuda.current_device()`` only to build ``self.target_device =
    torch.device(f"cuda:{...}")`` (sample() moves experiences there). Read from 0.11.2 (trainer/ray/*.py,
    trainer/ppo_utils/replay_buffer.py). Breaks if: another torch.cuda call appears on the PPO path (that actor
    fails with 'Torch not compiled with CUDA enabled': add it here) or the buffer builds its device differently
    (the actor fails at init with 'Invalid device string' or moves experiences to CUDA).
    """
    if torch.cuda.is_available():
        return False
    if getattr(torch.cuda, _PATCHED_FLAG, False):
        return True
    for name, cpu_meaning in WORKER_CUDA_CALLS.items():
        setattr(torch.cuda, name, cpu_meaning)
    from openrlhf.trainer.ppo_utils import replay_buffer

    init = replay_buffer.NaiveReplayBuffer.__init__

    @functools.wraps(init)
    def cpu_buffer_init(self, *args, **kwargs):
        torch.cuda.current_device = lambda: 0  # the f"cuda:{...}" device string must parse; replaced just below
        try:
            init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = WORKER_CUDA_CALLS["current_device"]
        self.target_device = torch.device("cpu")

    replay_buffer.NaiveReplayBuffer.__init__ = cpu_buffer_init
    setattr(torch.cuda, _PATCHED_FLAG, True)
    return True


# Signatures the Ray PPO pieces rely on (checked like HOOKS, with the vLLM stand-in registered where vllm is missing,
# since these modules import vllm): (module, attribute path, leading parameter names, who relies on it).
PPO_HOOKS = (
    ("openrlhf.trainer.ppo_utils.replay_buffer", "NaiveReplayBuffer.__init__", ("self", "sample_batch_size"),
     "patch_torch_cuda_for_cpu_worker"),
    ("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.__init__",
     ("self", "actor_model_group", "critic_model_group", "reward_model_group", "initial_model_group",
      "kl_controller", "strategy", "tokenizer"), "ppo_dense_trainer.DensePPOTrainer, ppo_dense.DenseExperienceMaker"),
    ("openrlhf.trainer.ray.launcher", "RayActorGroup.__init__",
     ("self", "num_nodes", "num_gpus_per_node", "ray_actor_type", "pg", "num_gpus_per_actor", "duplicate_actors"),
     "ppo_dense_trainer.DensePPOTrainer"),
    ("openrlhf.trainer.ray.launcher", "RayActorGroup.async_init_model_from_pretrained", ("self",),
     "ppo_dense_trainer.DensePPOTrainer"),
    ("openrlhf.trainer.ppo_trainer", "BasePPOTrainer.fit", ("self", "global_step"), "ppo_dense_trainer.DensePPOTrainer"),
    ("openrlhf.utils.distributed_util", "stateless_init_process_group",
     ("master_address", "master_port", "rank", "world_size", "device"), "vllm_standin.StatelessProcessGroup"),
    ("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor.__ray_actor_class__.init_process_group",
     ("self", "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend", "use_ray"),
     "vllm_standin._Worker.init_process_group"),
    ("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor.__ray_actor_class__.update_weight", ("self", "name", "dtype", "shape"),
     "vllm_standin._Worker.update_weight"),
)


def ray_actor_class(actor_class):
    """The class a ``@ray.remote`` actor class was made from (e.g. ``PPOTrainer``'s ``BasePPOTrainer`` subclass),
    to subclass it and wrap the subclass with ``ray.remote`` again.

    Relies on: Ray's actor classes exposing the decorated class as ``__ray_actor_class__`` (set by
    ``ray.actor._modify_class``, reached through the ``ActorClass``'s MRO). Read from Ray 2.55.0 with OpenRLHF 0.11.2
    (``@ray.remote class PPOTrainer(BasePPOTrainer)``). Breaks if: Ray renames it (AttributeError when the dense
    trainer is built: tests/test_openrlhf_internals.py checks it).
    """
    return actor_class.__ray_actor_class__


@contextlib.contextmanager
def ppo_trainer_class(trainer_class):
    """Within the block, ``train_ppo_ray.train`` builds its trainer from ``trainer_class`` (a ``ray.remote`` actor
    class taking ``PPOTrainer``'s arguments) instead of ``PPOTrainer``; restored after.

    Relies on: ``train()`` importing ``PPOTrainer`` from ``openrlhf.trainer.ppo_trainer`` at call time (``from
    openrlhf.trainer.ppo_trainer import PPOTrainer`` inside the function, on the synchronous path; the async path
    imports ``PPOTrainerAsync`` from ``ppo_trainer_async``, which this does not touch) and calling
    ``PPOTrainer.remote(pretrain, strategy, actor, critic, reward, ref, vllm_engines, **generate_kwargs)``. Read from
    0.11.2 (cli/train_ppo_ray.py). Breaks if: train() imports it at module level or from elsewhere (the swap is
    silently unused: tests/test_openrlhf_internals.py checks the import line) or passes other arguments.
    """
    from openrlhf.trainer import ppo_trainer

    original = ppo_trainer.PPOTrainer
    ppo_trainer.PPOTrainer = trainer_class
    try:
        yield
    finally:
        ppo_trainer.PPOTrainer = original


@contextlib.contextmanager
def extra_flags_on_first_parse(add_flags, after_parse):
    """Within the block, the first ``argparse.ArgumentParser.parse_args`` call (train_ppo_ray's ``__main__`` builds
    one parser and parses once) first gets ``add_flags(parser.add_argument)``, and its flat result is handed to
    ``after_parse(args)`` (which may raise SystemExit to refuse the flags) before it is returned. Later calls, and
    every call after the block, are argparse's own.

    Relies on: train_ppo_ray's ``__main__`` declaring all its flags on one ``argparse.ArgumentParser`` and calling
    its ``parse_args()`` once, then ``hierarchize``-ing the result (flags named ``--group.name``). Read from 0.11.2.
    Breaks if: it parses twice or with another parser class (the extra flags would be unknown: 'unrecognized
    arguments') or declares a flag of ours (argparse raises a conflict error at start).
    """
    import argparse

    original = argparse.ArgumentParser.parse_args
    state = {"used": False}

    def parse_args(parser, args=None, namespace=None):
        if state["used"]:
            return original(parser, args, namespace)
        state["used"] = True
        add_flags(parser.add_argument)
        parsed = original(parser, args, namespace)
        after_parse(parsed)
        return parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


@contextlib.contextmanager
def ray_init_with(update):
    """Within the block, ``ray.init(**kwargs)`` is called with ``update(kwargs)`` (a new kwargs dict) instead.

    For train_ppo_ray's own ``ray.init``: its runtime environment (the env vars it sets) is kept, and the CPU runtime
    adds its logical GPUs and worker set-up hook. Relies on: ``train()`` calling ``ray.init(runtime_env=...)`` through
    the ``ray`` module attribute when Ray is not initialized. Read from 0.11.2 (cli/train_ppo_ray.py). Breaks if:
    train() stops calling ``ray.init`` itself (Ray would start on first use without logical GPUs, and the placement
    groups would wait forever: tests/test_openrlhf_internals.py checks the call).
    """
    import ray

    original = ray.init

    @functools.wraps(original)
    def init(*args, **kwargs):
        return original(*args, **update(dict(kwargs)))

    ray.init = init
    try:
        yield
    finally:
        ray.init = original
