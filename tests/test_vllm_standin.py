"""The vLLM stand-in (openrlhf_sepo/vllm_standin.py), in-process: it is registered only where no vllm is installed
(a real or fake importable vllm is never shadowed, a broken one is an error), OpenRLHF's own rollout actor generates
with it (token ids, action ranges and the sampled tokens' log-probs, checked against a plain HF forward), and
OpenRLHF's own weight-sync calls (``stateless_init_process_group`` + ``broadcast`` on the actor side, the rollout
actor's ``init_process_group`` / ``update_weight`` on the engine side) move bf16 weights into the engine's model."""

import asyncio
import importlib
import os
import sys
import threading
import types

import pytest
import torch

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import vllm_standin
from openrlhf_sepo.cpu import free_port

REAL_VLLM = vllm_standin.vllm_installed()


def _vllm_modules():
    return {n: m for n, m in sys.modules.items() if n == "vllm" or n.startswith("vllm.")}


@pytest.fixture
def no_vllm():
    """No ``vllm`` module registered during the test; exactly the ones before it after."""
    saved = _vllm_modules()
    for name in saved:
        del sys.modules[name]
    yield
    for name in _vllm_modules():
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def standin(no_vllm):
    if REAL_VLLM:
        pytest.skip("vllm is installed here: the stand-in is not used")
    assert vllm_standin.install_if_missing()
    return sys.modules["vllm"]


def test_an_importable_vllm_is_never_shadowed(no_vllm, tmp_path, monkeypatch):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text('__version__ = "9.9.9"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert vllm_standin.install_if_missing() is False
    assert sys.modules["vllm"].__version__ == "9.9.9" and not vllm_standin.is_standin(sys.modules["vllm"])
    assert vllm_standin.engine_description() == "vLLM 9.9.9"


def test_a_vllm_already_in_sys_modules_is_kept(no_vllm, monkeypatch):
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.29.0"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    assert vllm_standin.install_if_missing() is False and sys.modules["vllm"] is fake
    assert vllm_standin.engine_description() == "vLLM 0.29.0"


def test_an_installed_vllm_that_fails_to_import_is_an_error(no_vllm, tmp_path, monkeypatch):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text('raise ImportError("libcuda.so.1: cannot open shared object")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="libcuda"):
        vllm_standin.install_if_missing()
    assert "vllm" not in sys.modules or not vllm_standin.is_standin(sys.modules["vllm"])


def test_without_vllm_the_standin_answers_openrlhfs_imports(standin):
    assert vllm_standin.is_standin(standin) and vllm_standin.install_if_missing()  # idempotent
    assert vllm_standin.engine_description() == "vLLM stand-in (HF generate; vllm not importable)"
    from vllm import SamplingParams  # noqa: F401  (samples_generator.py)
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator  # noqa: F401  (distributed_util)
    from vllm.distributed.utils import StatelessProcessGroup  # noqa: F401
    from vllm.inputs import TokensPrompt  # noqa: F401  (vllm_engine.py)
    from vllm.utils import random_uuid  # noqa: F401

    assert standin.__version__.endswith("+openrlhf_sepo.standin")
    importlib.import_module("openrlhf.trainer.ray.vllm_engine")
    importlib.import_module("openrlhf.trainer.ppo_utils.samples_generator")


def _rollout_actor(base, dtype="float32"):
    """OpenRLHF's RolloutRayActor (its class, not the Ray actor) holding a stand-in engine, as its __init__ would."""
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    cls = RolloutRayActor.__ray_actor_class__
    actor = cls.__new__(cls)
    actor.executor, actor._mm_pad_token_ids = SingleTurnAgentExecutor(None), None
    actor.llm = vllm_standin.AsyncLLMEngine.from_engine_args(
        vllm_standin.AsyncEngineArgs(model=base, dtype=dtype, seed=0, max_model_len=64))
    return actor


def test_openrlhfs_rollout_actor_generates_with_the_standin(standin, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = os.path.join(tiny_dir, "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    actor = _rollout_actor(base)
    assert actor.get_num_unfinished_requests() == 0
    prompt = "<|user|>\nWrite a short note about the river.</s>\n<|assistant|>\n"
    params = standin.SamplingParams(temperature=1.0, max_tokens=8, logprobs=1)
    outputs = asyncio.run(actor.generate_responses(prompt, "label", params, 64, tokenizer, num_samples=2))

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for out in outputs:
        ids = out["observation_tokens"]
        (start, end), = out["action_ranges"]
        assert ids[:start] == prompt_ids and start == len(prompt_ids) and 1 <= end - start <= 8
        assert end - start == 8 or ids[end - 1] == tokenizer.eos_token_id  # stopped by EOS (kept) or by length
        assert out["truncated"] == (ids[end - 1] != tokenizer.eos_token_id)
        with torch.no_grad():
            logps = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        expected = [logps[t - 1, ids[t]].item() for t in range(start, end)]
        assert out["rollout_log_probs"][:start] == [0.0] * start
        assert out["rollout_log_probs"][start:] == pytest.approx(expected, abs=1e-4)

    greedy = standin.SamplingParams(temperature=0.0, max_tokens=6)
    a, b = (asyncio.run(actor.generate_responses(prompt, None, greedy, 64, tokenizer))[0] for _ in range(2))
    assert a["observation_tokens"] == b["observation_tokens"]  # greedy is deterministic
    assert a["rollout_log_probs"] is None  # not asked for


def test_concurrent_requests_are_generated_in_one_batch_as_they_would_be_alone(standin, tiny_dir, monkeypatch):
    """Prompts of different lengths sent concurrently (as OpenRLHF sends a rollout's) go through ONE left-padded
    generate call, and each gets what it gets alone: greedy tokens equal, log-probs those of a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = os.path.join(tiny_dir, "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    actor = _rollout_actor(base)
    prompts = [f"<|user|>\nWrite a short note about the {topic}.</s>\n<|assistant|>\n"
               for topic in ("river", "old stone bridge near the lake", "sky")]
    assert len({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}) == 3
    greedy = standin.SamplingParams(temperature=0.0, max_tokens=6, logprobs=1)
    engine, batches = actor.llm, []
    real = engine._generate
    monkeypatch.setattr(engine, "_generate", lambda prompts, sp: batches.append(len(prompts)) or real(prompts, sp))

    async def together():
        return await asyncio.gather(*(actor.generate_responses(p, None, greedy, 64, tokenizer) for p in prompts))

    batched = [r[0] for r in asyncio.run(together())]
    assert batches == [3]
    alone = [asyncio.run(actor.generate_responses(p, None, greedy, 64, tokenizer))[0] for p in prompts]
    assert batches == [3, 1, 1, 1]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for b, a in zip(batched, alone):
        assert b["observation_tokens"] == a["observation_tokens"]
        ids, ((start, end),) = b["observation_tokens"], b["action_ranges"]
        with torch.no_grad():
            logps = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        assert b["rollout_log_probs"][start:] == pytest.approx([logps[t - 1, ids[t]].item() for t in range(start, end)],
                                                               abs=1e-4)


def test_openrlhfs_weight_sync_reaches_the_standin_engine(standin, tiny_dir):
    from openrlhf.utils.distributed_util import stateless_init_process_group

    actor = _rollout_actor(os.path.join(tiny_dir, "base"), dtype="bfloat16")
    name = "model.layers.0.mlp.up_proj.weight"
    param = actor.llm.model.get_parameter(name)
    new = torch.randn(param.shape).to(torch.bfloat16)
    assert not torch.equal(param, new)
    port, errors = free_port(), []

    def engine_side():  # what PolicyModelActor's refs run on the rollout actor
        try:
            asyncio.run(actor.init_process_group("127.0.0.1", port, 1, 2, "openrlhf", "gloo", False))
            asyncio.run(actor.update_weight(name, dtype=torch.bfloat16, shape=new.shape, empty_cache=True))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    thread = threading.Thread(target=engine_side)
    thread.start()
    group = stateless_init_process_group("127.0.0.1", port, 0, 2, "cpu")  # ActorPPOTrainer._init_vllm_sync_group
    group.broadcast(new, src=0, stream=None)  # ActorPPOTrainer.broadcast_to_vllm
    thread.join(timeout=60)
    assert not errors and not thread.is_alive()
    assert torch.equal(actor.llm.model.get_parameter(name), new)


def test_the_standin_refuses_what_it_cannot_do(standin):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        standin.AsyncEngineArgs(model="m", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="logprobs"):
        standin.SamplingParams(logprobs=5)
