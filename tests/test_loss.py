"""SePOLoss: the formula by hand, gradient only at selected positions, SimPO at k = 1, clear errors."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from openrlhf_sepo import SePOLoss
from openrlhf_sepo.scoring import select_key_tokens


def test_matches_hand_computation():
    chosen = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -8.0, -1.5]])
    rejected = torch.tensor([[-2.0, -6.0, -1.0, -9.0], [-3.0, -1.0, -2.0, -2.0]])
    c_mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    r_mask = torch.tensor([[0, 1, 0, 1], [0, 1, 1, 1]])
    beta, gamma = 2.0, 0.5
    u_w = [(-2.0 - 3.0) / 2, -0.5]
    u_l = [(-6.0 - 9.0) / 2, (-1.0 - 2.0 - 2.0) / 3]
    expected = sum(math.log(1 + math.exp(-(beta * (w - l) - gamma))) for w, l in zip(u_w, u_l)) / 2

    loss, chosen_reward, rejected_reward = SePOLoss(beta, gamma)(chosen, rejected, c_mask, r_mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen_reward.tolist() == pytest.approx([beta * u for u in u_w])
    assert rejected_reward.tolist() == pytest.approx([beta * u for u in u_l])
    assert not chosen_reward.requires_grad and not rejected_reward.requires_grad


def test_gradient_reaches_selected_positions_only():
    torch.manual_seed(0)
    chosen = torch.randn(3, 7).log_softmax(-1).requires_grad_()
    rejected = torch.randn(3, 7).log_softmax(-1).requires_grad_()
    c_mask = torch.rand(3, 7) < 0.4
    r_mask = torch.rand(3, 7) < 0.4
    c_mask[:, 0] = r_mask[:, 6] = True  # no empty row
    rejected.data[~r_mask] = -math.inf  # an unselected -inf must neither leak into the loss nor make it NaN

    loss, _, _ = SePOLoss(1.5, 0.2)(chosen, rejected, c_mask.float(), r_mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(chosen.grad != 0, c_mask) and torch.equal(rejected.grad != 0, r_mask)
    assert (chosen.grad[c_mask] < 0).all() and (rejected.grad[r_mask] > 0).all()  # push u_w up, u_l down


def test_full_selection_is_simpo(tiny_dir):
    """k = 1 selects every response token: the loss is SimPO's, -log sigmoid(beta * (mean log p(y_w) - mean log
    p(y_l)) - gamma), with the means taken by OpenRLHF's DPOTrainer._get_batch_logps on a real tiny Actor."""
    from openrlhf.models import Actor
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    torch.manual_seed(0)
    actor = Actor(os.path.join(tiny_dir, "base"), attn_implementation="sdpa")
    actor.model.float()
    batch, width = 4, 20
    prompt_lens = [3, 5, 4, 6]
    lengths = torch.tensor([20, 15, 18, 11])
    ids = torch.randint(10, 300, (2 * batch, width))
    att = (torch.arange(width) < lengths.repeat(2).unsqueeze(1)).long()
    logps = actor(ids, attention_mask=att, return_logprobs=True)
    assert logps.shape == (2 * batch, width - 1)

    masks = torch.zeros(2 * batch, width - 1, dtype=torch.bool)
    responses = lengths.repeat(2) - torch.tensor(prompt_lens * 2)
    selected = select_key_tokens(torch.randn(2 * batch, width), 1.0, True, responses)
    for row, p in enumerate(prompt_lens * 2):
        masks[row, p - 1 :] = selected[row, : width - p]

    beta, gamma = 2.5, 0.3
    loss, _, _ = SePOLoss(beta, gamma)(logps[:batch], logps[batch:], masks[:batch], masks[batch:])
    _, means = DPOTrainer._get_batch_logps(None, logps, att, prompt_lens * 2)
    simpo = -F.logsigmoid(beta * (means[:batch] - means[batch:]) - gamma).mean()
    torch.testing.assert_close(loss, simpo)


def test_empty_selection_is_an_error_not_nan():
    logps = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no selected token"):
        SePOLoss()(logps, logps, mask, empty)


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta must be > 0"):
        SePOLoss(beta=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        SePOLoss()(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 3), torch.ones(2, 4))
