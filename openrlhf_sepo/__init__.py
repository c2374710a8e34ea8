"""openrlhf-sepo: Selective Preference Optimization (SePO) as an OpenRLHF plugin.

Public pieces (imported lazily, so ``import openrlhf_sepo`` stays cheap):

- ``SePOLoss``             reference-free contrastive loss over selected key tokens (``loss.py``)
- ``TokenScoreDataset``    ``score_tokens`` output -> OpenRLHF DPO batches + selection masks (``datasets.py``)
- ``SelectiveDPOTrainer``  OpenRLHF ``DPOTrainer`` without a reference model (``trainer.py``)
- ``select_key_tokens``    the per-response top-k / bottom-k rule (``scoring.py``)
- ``RankedListDataset``, ``TokenRewardModelTrainer``   a token-level reward model learned from ranked lists with
  ListMLE (``token_rm_data.py``, ``token_rm_trainer.py``; formulas in ``token_rm.py``)
- ``WeightedSFTDataset``, ``WeightedMLETrainer``       reward-weighted MLE on token rewards (``wmle_data.py``,
  ``wmle_trainer.py``; the weights in ``wmle.py``)
- ``TKPOLoss``, ``CounterfactualSFTDataset``, ``TKPOTrainer``   TKPO for controllable generation (``tkpo.py``,
  ``tkpo_data.py``, ``tkpo_trainer.py``)
"""

from openrlhf_sepo._flash_attn import install_placeholder as _install_flash_attn_placeholder

__version__ = "0.1.0.dev0"

# Must run before anything imports OpenRLHF, which imports flash-attn at import time.
_install_flash_attn_placeholder()

_LAZY = {
    "SePOLoss": "openrlhf_sepo.loss",
    "TokenScoreDataset": "openrlhf_sepo.datasets",
    "SelectiveDPOTrainer": "openrlhf_sepo.trainer",
    "select_key_tokens": "openrlhf_sepo.scoring",
    "RankedListDataset": "openrlhf_sepo.token_rm_data",
    "TokenRewardModelTrainer": "openrlhf_sepo.token_rm_trainer",
    "WeightedSFTDataset": "openrlhf_sepo.wmle_data",
    "WeightedMLETrainer": "openrlhf_sepo.wmle_trainer",
    "TKPOLoss": "openrlhf_sepo.tkpo",
    "CounterfactualSFTDataset": "openrlhf_sepo.tkpo_data",
    "TKPOTrainer": "openrlhf_sepo.tkpo_trainer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openrlhf_sepo' has no attribute {name!r}")
