"""The PPO trainer of ``train_ppo_dense``: OpenRLHF's own ``PPOTrainer`` (the single controller of its Ray PPO), with
the dense-reward sources added.

``DensePPOTrainer`` subclasses the class behind OpenRLHF's ``@ray.remote PPOTrainer`` and ``DensePPOTrainerActor`` is
its Ray actor class; ``openrlhf_sepo.ppo_dense_run`` makes train_ppo_ray's ``train()`` build it in ``PPOTrainer``'s
place (``openrlhf_internals.ppo_trainer_class``). With ``--dense.source none`` it is OpenRLHF's trainer, unchanged.

Import this module only where ``import vllm`` works (OpenRLHF's trainer imports it): after
``openrlhf_sepo.vllm_standin.install_if_missing()`` in a driver, and in Ray workers, where the CPU runtime's set-up
hook registers the stand-in first.
"""

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer

from openrlhf_sepo.openrlhf_internals import ray_actor_class


class DensePPOTrainer(ray_actor_class(PPOTrainer)):
    """OpenRLHF's PPOTrainer, same arguments (``pretrain, strategy, actor, critic, reward, ref, vllm_engines,
    **generate_kwargs``) and behaviour; ``dense_source`` is ``strategy.args.dense.source``."""

    def __init__(self, pretrain, strategy, *groups_and_engines, **generate_kwargs):
        super().__init__(pretrain, strategy, *groups_and_engines, **generate_kwargs)
        self.dense_source = strategy.args.dense.source
        if self.dense_source != "none":
            raise NotImplementedError(f"--dense.source {self.dense_source}: the dense sources are not wired in yet")


DensePPOTrainerActor = ray.remote(DensePPOTrainer)
