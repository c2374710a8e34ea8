"""A STAND-IN for vLLM, for machines where ``import vllm`` fails (no vLLM installed, e.g. a CPU-only machine).

This is not vLLM and not a port of it. It is the slice of vLLM's interface that OpenRLHF 0.11.2's Ray PPO calls on
its rollout engines, implemented with Hugging Face ``generate`` (concurrent requests batched with left padding, no continuous
batching, no KV-cache management, no tensor parallelism), so that OpenRLHF's own ``RolloutRayActor`` (openrlhf/trainer/ray/vllm_engine.py),
``SamplesGenerator`` and the actor's weight sync run unchanged. ``install_if_missing()`` registers it as the modules
``vllm``, ``vllm.inputs``, ``vllm.utils``, ``vllm.distributed.utils`` and
``vllm.distributed.device_communicators.pynccl`` ONLY when ``import vllm`` fails because no ``vllm`` is installed; an
importable vLLM is never shadowed, and an installed vLLM that fails to import is an error, not a reason to fall back.
``engine_description()`` names the engine in use, for the run's log.

What OpenRLHF calls, and what the stand-in does (read from OpenRLHF 0.11.2 against vLLM 0.29.0, the version it pins):

==================================================================  =================================================
OpenRLHF's call                                                     the stand-in
==================================================================  =================================================
``vllm.__version__`` (version gates)                                ``"0.29.0+openrlhf_sepo.standin"``
``vllm.AsyncEngineArgs(**kwargs)``                                  keeps ``model``, ``dtype``, ``seed``,
                                                                    ``max_model_len``, ``logprobs_mode``,
                                                                    ``trust_remote_code``; refuses
                                                                    ``tensor_parallel_size > 1``; the rest (memory,
                                                                    caching, eager mode, sleep mode) has no meaning
                                                                    here and is ignored
``vllm.AsyncLLMEngine.from_engine_args(args)``                      loads the HF causal LM and its tokenizer
``engine.generate(TokensPrompt, SamplingParams, request_id)``       ``model.generate`` on the prompt ids; yields one
                                                                    final ``RequestOutput`` (token ids with the EOS
                                                                    that stopped it, text, ``finish_reason`` "stop" /
                                                                    "length", per-token ``Logprob`` when asked:
                                                                    processed = after temperature/top-p/top-k, raw =
                                                                    the model's)
``engine.collective_rpc("init_process_group", args)``              joins a gloo group of its own with the training
                                                                    actor's rank 0 (``StatelessProcessGroup`` below)
``engine.collective_rpc("update_weight", args)``                   receives one parameter by broadcast and copies it
                                                                    into the HF model by name
``engine.collective_rpc("update_weight_cuda_ipc", ...)``           refused (CUDA IPC has no CPU meaning)
``is_sleeping`` / ``sleep`` / ``wake_up`` / ``reset_prefix_cache``  state flags only: nothing to free or reset
``pause_generation`` / ``resume_generation``                        hold / release new generations
``output_processor.get_num_unfinished_requests()``                  requests in flight
``vllm.SamplingParams``, ``vllm.inputs.TokensPrompt``,              plain data holders with vLLM's field names
``vllm.utils.random_uuid``
``StatelessProcessGroup.create`` + ``PyNcclCommunicator(pg, dev)``  a ``TCPStore`` + ``ProcessGroupGloo`` outside
  ``.broadcast(tensor, src, stream)``                               the default group; tensors travel as bytes
                                                                    (gloo has no bf16), any ``--vllm.sync_backend``
==================================================================  =================================================

Semantics that differ from vLLM: sampling follows HF's logits processors (same temperature / top-p / top-k
definitions, different random streams, so samples differ from vLLM's for a seed); ``seed`` in SamplingParams seeds
torch's global RNG in the engine process; a model is loaded in the engine args' ``dtype`` and weight updates are cast
to it (vLLM asserts equal dtypes).
"""

import asyncio
import copy
import importlib
import importlib.machinery
import sys
import threading
import types
import uuid

VLLM_INTERFACE_VERSION = "0.29.0"  # the vLLM that OpenRLHF 0.11.2 pins (openrlhf[vllm])
__version__ = f"{VLLM_INTERFACE_VERSION}+openrlhf_sepo.standin"
IS_STANDIN = True  # also set on the registered ``vllm`` module: ``is_standin(sys.modules["vllm"])``
STANDIN_DESCRIPTION = "vLLM stand-in (HF generate; vllm not importable)"
BATCH_WINDOW_S = 0.05  # how long the first queued request waits for others to join its batch

# Module names the stand-in answers for, and what each holds (all objects live in this module).
MODULES = {
    "vllm": ("SamplingParams", "AsyncEngineArgs", "AsyncLLMEngine", "RequestOutput", "CompletionOutput", "Logprob",
             "TokensPrompt", "__version__", "IS_STANDIN"),
    "vllm.inputs": ("TokensPrompt",),
    "vllm.utils": ("random_uuid",),
    "vllm.distributed": (),
    "vllm.distributed.utils": ("StatelessProcessGroup",),
    "vllm.distributed.device_communicators": (),
    "vllm.distributed.device_communicators.pynccl": ("PyNcclCommunicator",),
}


# --- registration ------------------------------------------------------------------------------------------------

def is_standin(module) -> bool:
    """Whether ``module`` (e.g. ``sys.modules["vllm"]``) is this stand-in."""
    return bool(getattr(module, "IS_STANDIN", False))


def vllm_installed() -> bool:
    """Whether a ``vllm`` package is installed on ``sys.path`` (importable or not), the stand-in never counting."""
    return importlib.machinery.PathFinder.find_spec("vllm") is not None


def install_if_missing() -> bool:
    """Make ``import vllm`` work: the real vLLM when it imports, else this stand-in. Returns True iff the stand-in
    is (now) registered. Idempotent.

    The stand-in is registered only when no ``vllm`` is installed (``import vllm`` raises ModuleNotFoundError for
    ``vllm`` itself). An installed vLLM that fails to import raises RuntimeError with the cause: falling back would
    hide a broken install behind a far slower engine.
    """
    if is_standin(sys.modules.get("vllm")):
        return True
    try:
        importlib.import_module("vllm")
        return False
    except Exception as e:  # noqa: BLE001  (any failure of an installed vllm is reported, not replaced)
        missing = isinstance(e, ModuleNotFoundError) and e.name == "vllm" and not vllm_installed()
        if not missing:
            raise RuntimeError(f"vllm is installed but does not import ({e!r}); fix or uninstall it: the vLLM "
                               "stand-in replaces only a missing vllm") from e
    this = sys.modules[__name__]
    for name, attributes in MODULES.items():
        module = types.ModuleType(name, f"openrlhf_sepo.vllm_standin's stand-in for {name} (see that module).")
        module.__path__ = []  # a package, so the submodules resolve
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=__name__, is_package=True)
        module.IS_STANDIN = True
        for attribute in attributes:
            setattr(module, attribute, getattr(this, attribute))
        sys.modules[name] = module
    for name in MODULES:  # parent.child attributes, as the import system sets them
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    return True


def engine_description() -> str:
    """What generates in this process: ``"vLLM <version>"`` or ``STANDIN_DESCRIPTION``. Call after
    ``install_if_missing``."""
    module = sys.modules.get("vllm") or importlib.import_module("vllm")
    return STANDIN_DESCRIPTION if is_standin(module) else f"vLLM {module.__version__}"


# --- data holders (vLLM's names) ---------------------------------------------------------------------------------

class SamplingParams:
    """vLLM's sampling parameters that OpenRLHF sets (and ``n`` / ``seed``), with vLLM's names and defaults.
    ``max_tokens=None``: up to the engine's ``max_model_len``. ``top_k`` <= 0: no top-k. ``logprobs`` not None: the
    sampled token's log-prob per position (only the sampled one; ``logprobs > 1`` is refused)."""

    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, min_tokens=0,
                 skip_special_tokens=True, logprobs=None, seed=None):
        if logprobs is not None and logprobs > 1:
            raise ValueError("the vLLM stand-in returns the sampled token's log-prob only (logprobs <= 1)")
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.max_tokens, self.min_tokens, self.skip_special_tokens = max_tokens, min_tokens, skip_special_tokens
        self.logprobs, self.seed = logprobs, seed

    def __repr__(self):
        return f"SamplingParams(stand-in, {vars(self)})"


def TokensPrompt(prompt_token_ids, **fields) -> dict:  # noqa: N802 (vLLM's name; a TypedDict there)
    """vLLM's token prompt: a dict with ``prompt_token_ids`` (and ``multi_modal_data``, refused by ``generate``)."""
    return {"prompt_token_ids": list(prompt_token_ids), **fields}


def random_uuid() -> str:
    return uuid.uuid4().hex


class Logprob:
    def __init__(self, logprob, rank=None, decoded_token=None):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class CompletionOutput:
    """One sample: ``token_ids`` (the EOS that stopped it included, as vLLM's), ``text``, ``finish_reason``
    ("stop" or "length"), ``logprobs`` (per token ``{token_id: Logprob}``, or None)."""

    def __init__(self, index, text, token_ids, cumulative_logprob, logprobs, finish_reason):
        self.index, self.text, self.token_ids = index, text, token_ids
        self.cumulative_logprob, self.logprobs, self.finish_reason = cumulative_logprob, logprobs, finish_reason


class RequestOutput:
    def __init__(self, request_id, prompt_token_ids, outputs):
        self.request_id, self.prompt_token_ids, self.outputs, self.finished = request_id, prompt_token_ids, outputs, True


# --- weight sync -------------------------------------------------------------------------------------------------

class StatelessProcessGroup:
    """vLLM's process group outside torch.distributed's default group: here a ``TCPStore`` (rank 0 serves it) and a
    gloo group on it. ``create(host, port, rank, world_size)``."""

    def __init__(self, store, rank, world_size, group):
        self.store, self.rank, self.world_size, self.group = store, rank, world_size, group

    @classmethod
    def create(cls, host, port, rank, world_size, store_timeout=300):
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=store_timeout)
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
        return cls(store, rank, world_size, dist.ProcessGroupGloo(store, rank, world_size, timeout))


class PyNcclCommunicator:
    """vLLM's communicator, over the gloo group of a ``StatelessProcessGroup``: ``broadcast(tensor, src, stream)``
    fills ``tensor`` on every rank with ``src``'s. Tensors travel as their bytes (gloo has no bf16), through a CPU
    copy when they live on a GPU. ``stream`` is ignored."""

    def __init__(self, group: StatelessProcessGroup, device=None):
        self.group, self.device, self.rank = group, device, group.rank

    def broadcast(self, tensor, src, stream=None):
        import torch
        import torch.distributed as dist

        data = tensor.detach().contiguous()
        data = data if data.device.type == "cpu" else data.cpu()
        as_bytes = data.view(-1).view(torch.uint8)
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.group.group.broadcast([as_bytes], opts).wait()
        if self.rank != src and (data.data_ptr() != tensor.data_ptr()):
            tensor.copy_(data.view(tensor.shape))


class _Worker:
    """The engine's one worker: the HF model and the worker-side RPCs of OpenRLHF's weight sync (what
    ``openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap`` provides inside real vLLM workers)."""

    def __init__(self, model, lock):
        self.model, self.lock, self.comm = model, lock, None

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend="nccl",
                           use_ray=False):
        if use_ray:
            raise NotImplementedError("the vLLM stand-in syncs weights through its own gloo group; drop "
                                      "--vllm.sync_with_ray")
        # One worker per engine (tensor_parallel_size 1): its rank in the sync group is rank_offset.
        group = StatelessProcessGroup.create(master_address, master_port, rank_offset, world_size)
        self.comm = PyNcclCommunicator(group, device="cpu")

    def update_weight(self, name, dtype, shape, empty_cache=False):
        import torch

        weight = torch.empty(shape, dtype=dtype)
        self.comm.broadcast(weight, src=0)
        try:
            param = self.model.get_parameter(name)
        except AttributeError as e:
            raise KeyError(f"vLLM stand-in: the actor sent {name!r}, which the engine's model does not have") from e
        with self.lock, torch.no_grad():
            param.copy_(weight.to(param.device))

    def update_weight_cuda_ipc(self, *args, **kwargs):
        raise NotImplementedError("CUDA IPC weight sync (--train.colocate_all with --vllm.sync_backend nccl) has no "
                                  "meaning for the vLLM stand-in; use --vllm.sync_backend gloo")


# --- the engine --------------------------------------------------------------------------------------------------

class AsyncEngineArgs:
    """The engine arguments the stand-in uses (see the module docstring); others are accepted and ignored."""

    def __init__(self, model, dtype="auto", seed=0, max_model_len=None, tensor_parallel_size=1,
                 trust_remote_code=False, logprobs_mode="raw_logprobs", **ignored):
        if tensor_parallel_size != 1:
            raise ValueError("the vLLM stand-in runs one worker per engine: --vllm.tensor_parallel_size 1")
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"the vLLM stand-in supports logprobs_mode raw_logprobs / processed_logprobs, "
                             f"not {logprobs_mode!r}")
        self.model, self.dtype, self.seed, self.max_model_len = model, dtype, seed, max_model_len
        self.trust_remote_code, self.logprobs_mode, self.ignored = trust_remote_code, logprobs_mode, ignored


class _OutputProcessor:
    def __init__(self):
        self.unfinished = 0

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished


class AsyncLLMEngine:
    """The stand-in engine: an HF causal LM generating the concurrent requests in left-padded batches (in a thread,
    so the actor's event loop keeps answering). See the module docstring for each method."""

    def __init__(self, args: AsyncEngineArgs):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        name = str(args.dtype).replace("torch.", "")
        dtype = "auto" if name == "auto" else getattr(torch, {"half": "float16", "float": "float32"}.get(name, name))
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                          trust_remote_code=args.trust_remote_code).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        self.max_model_len = args.max_model_len or getattr(self.model.config, "max_position_embeddings", 2048)
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        torch.manual_seed(args.seed)
        self._lock = threading.Lock()  # generation vs weight updates
        self._worker = _Worker(self.model, self._lock)
        self._queue, self._batching = [], False  # requests waiting for the next batch (``_submit``)
        self._running = asyncio.Event()
        self._running.set()
        self._sleeping = False
        self.output_processor = _OutputProcessor()

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs):
        return cls(engine_args)

    async def is_sleeping(self) -> bool:
        return self._sleeping

    async def sleep(self, level=1):
        self._sleeping = True

    async def wake_up(self, tags=None):
        self._sleeping = False

    async def reset_prefix_cache(self):
        pass  # no prefix cache

    async def pause_generation(self, mode="keep"):
        self._running.clear()

    async def resume_generation(self):
        self._running.set()

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        """Call the worker's ``method(*args, **kwargs)``; a list with its result (one worker)."""
        return [await asyncio.to_thread(getattr(self._worker, method), *args, **(kwargs or {}))]

    async def generate(self, prompt, sampling_params: SamplingParams, request_id=None, **unused):
        """Yield one final ``RequestOutput`` for ``prompt`` (a ``TokensPrompt``)."""
        if prompt.get("multi_modal_data"):
            raise NotImplementedError("the vLLM stand-in generates from text tokens only")
        await self._running.wait()
        self.output_processor.unfinished += 1
        try:
            outputs = await self._submit(list(prompt["prompt_token_ids"]), copy.deepcopy(sampling_params))
        finally:
            self.output_processor.unfinished -= 1
        yield RequestOutput(request_id or random_uuid(), prompt["prompt_token_ids"], outputs)

    async def _submit(self, prompt_ids, sp: SamplingParams):
        """Queue one request and wait for its completions. OpenRLHF sends a rollout's prompts to the engine
        concurrently; the requests that arrive within ``BATCH_WINDOW_S`` of the first, with equal sampling params, are
        generated by ONE left-padded ``model.generate`` (one call per prompt left a CPU mostly idle between tiny
        forwards: 14 of a 25 s PPO step at 32 prompts)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((prompt_ids, sp, future))
        if not self._batching:
            self._batching = True
            loop.create_task(self._run_batches())
        return await future

    async def _run_batches(self):
        """Generate the queued requests, a batch per distinct sampling params, until the queue is empty."""
        try:
            await asyncio.sleep(BATCH_WINDOW_S)
            while self._queue:
                queue, self._queue = self._queue, []
                groups = {}
                for item in queue:
                    groups.setdefault(repr(sorted(vars(item[1]).items())), []).append(item)
                for items in groups.values():
                    try:
                        results = await asyncio.to_thread(self._generate, [i[0] for i in items], items[0][1])
                    except BaseException as e:  # every waiting request gets the error, none hangs
                        for _, _, future in items:
                            if not future.done():
                                future.set_exception(e)
                        continue
                    for (_, _, future), completions in zip(items, results):
                        if not future.done():
                            future.set_result(completions)
        finally:  # no await between the empty queue and this: a request queued later starts a new loop
            self._batching = False

    def _generate(self, prompts, sp: SamplingParams) -> list:
        """Per prompt of ``prompts`` (lists of ids, sharing ``sp``), its ``sp.n`` ``CompletionOutput``s: one
        ``model.generate`` over the prompts left-padded to one width (the attention mask hides the padding; each
        row's new tokens start at that width). Each prompt keeps its own cap, ``max_model_len - len(prompt)``."""
        import torch

        caps = [max(1, min(sp.max_tokens if sp.max_tokens is not None else self.max_model_len - len(p),
                           self.max_model_len - len(p))) for p in prompts]
        max_new = max(caps)
        sample = sp.temperature is not None and sp.temperature > 0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos_token_ids or [0])[0]
        kwargs = dict(do_sample=sample, max_new_tokens=max_new, min_new_tokens=min(sp.min_tokens or 0, min(caps)),
                      num_return_sequences=sp.n, eos_token_id=self.eos_token_ids or None, pad_token_id=pad,
                      return_dict_in_generate=True)
        want_logprobs = sp.logprobs is not None
        if want_logprobs:  # per-step [rows, vocab] tensors: only when asked
            kwargs["output_logits" if self.args.logprobs_mode == "raw_logprobs" else "output_scores"] = True
        if sample:
            kwargs.update(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else None)
        if sp.seed is not None:
            torch.manual_seed(sp.seed)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        with self._lock, torch.no_grad():
            out = self.model.generate(input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                      **kwargs)
        if want_logprobs:
            steps = out.logits if self.args.logprobs_mode == "raw_logprobs" else out.scores
            # the sampled tokens' log-probs: [rows, new]
            picked = [s.float().log_softmax(-1).gather(-1, out.sequences[:, width + j, None])[:, 0]
                      for j, s in enumerate(steps)]
            logps = torch.stack(picked, dim=1)
        eos = set(self.eos_token_ids)
        results = []
        for i, cap in enumerate(caps):
            completions = []
            for k in range(sp.n):
                row = i * sp.n + k  # generate's rows: each prompt's n samples together
                new = out.sequences[row, width:width + cap].tolist()
                stop = next((j for j, t in enumerate(new) if t in eos), None)
                ids = new if stop is None else new[: stop + 1]  # the EOS that stopped it stays, as in vLLM
                token_logps = logps[row, : len(ids)].tolist() if want_logprobs else None
                completions.append(CompletionOutput(
                    index=k, text=self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens),
                    token_ids=ids, cumulative_logprob=sum(token_logps) if want_logprobs else None,
                    logprobs=[{t: Logprob(lp)} for t, lp in zip(ids, token_logps)] if want_logprobs else None,
                    finish_reason="stop" if stop is not None else "length"))
            results.append(completions)
        return results
