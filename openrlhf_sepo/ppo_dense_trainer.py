"""The PPO trainer of ``train_ppo_dense``: OpenRLHF's own ``PPOTrainer`` (the single controller of its Ray PPO), with
the dense-reward sources of ``openrlhf_sepo.ppo_dense`` added.

``DensePPOTrainer`` subclasses the class behind OpenRLHF's ``@ray.remote PPOTrainer`` and ``DensePPOTrainerActor`` is
its Ray actor class; ``openrlhf_sepo.ppo_dense_run`` makes train_ppo_ray's ``train()`` build it in ``PPOTrainer``'s
place (``openrlhf_internals.ppo_trainer_class``). With ``--dense.source none`` it is OpenRLHF's trainer, unchanged.

Import this module only where ``import vllm`` works (OpenRLHF's trainer imports it): after
``openrlhf_sepo.vllm_standin.install_if_missing()`` in a driver, and in Ray workers, where the CPU runtime's set-up
hook registers the stand-in first.
"""

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ray.launcher import RayActorGroup

from openrlhf_sepo.openrlhf_internals import ray_actor_class
from openrlhf_sepo.ppo_dense import DenseExperienceMaker, check_dense_flags


def dense_group_layout(args) -> tuple:
    """``(num_nodes, num_gpus_per_node)`` of each dense-source group: the reference model's (``--ref.*``), since a
    dense source is a frozen model read like the reference, with the same ring-attention / tensor-parallel
    duplicates."""
    return args.ref.num_nodes, args.ref.num_gpus_per_node


class DensePPOTrainer(ray_actor_class(PPOTrainer)):
    """OpenRLHF's PPOTrainer, same arguments (``pretrain, strategy, actor, critic, reward, ref, vllm_engines,
    **generate_kwargs``) and behaviour, plus the dense sources of ``check_dense_flags(strategy.args)`` (its plan is
    re-derived here from the flags the driver checked: tokenizers and configs only):

    - one ``RayActorGroup`` per ``plan.groups()`` entry (``dense_groups``, by name), laid out as the reference model
      (``dense_group_layout``), unplaced (no shared placement group), their models loaded from ``__init__`` on and
      waited for at the start of ``fit``;
    - ``experience_maker`` is ``DenseExperienceMaker`` with those groups (source ``none``: OpenRLHF's
      ``RemoteExperienceMaker`` is kept, and no group is made).
    """

    def __init__(self, pretrain, strategy, *groups_and_engines, **generate_kwargs):
        super().__init__(pretrain, strategy, *groups_and_engines, **generate_kwargs)
        args = strategy.args
        self.dense_plan = check_dense_flags(args)
        self.dense_groups, self._dense_loading = {}, []
        if self.dense_plan.source == "none":
            return
        num_nodes, gpus_per_node = dense_group_layout(args)
        for name, actor_class, init_args in self.dense_plan.groups():
            group = RayActorGroup(num_nodes, gpus_per_node, actor_class, pg=None, num_gpus_per_actor=1,
                                  duplicate_actors=args.ds.ring_attn_size * args.ds.tensor_parallel_size)
            self.dense_groups[name] = group
            # Loaded while the driver loads the actor / critic / reward models; fit waits for them.
            self._dense_loading += group.async_init_model_from_pretrained(strategy, *init_args)
        self.experience_maker = DenseExperienceMaker(
            self.actor_model_group, self.critic_model_group, self.reward_model_group, self.reference_model_group,
            self.kl_ctl, self.strategy, self.tokenizer, plan=self.dense_plan, dense_groups=self.dense_groups)

    def fit(self, *args, **kwargs):
        """OpenRLHF's ``fit``, once the dense sources' models are loaded."""
        if self._dense_loading:
            ray.get(self._dense_loading)
            self._dense_loading = []
        return super().fit(*args, **kwargs)


DensePPOTrainerActor = ray.remote(DensePPOTrainer)
