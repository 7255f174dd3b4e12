"""The DPO arithmetic, checked against numbers worked out by hand."""

import math

import pytest
import torch

from dpolab.logps import batch_loss, mean_of_batch_means, pair_metrics, sample_weighted_batch_mean, sequence_logps


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_sequence_logps_sums_completion_tokens_with_the_one_token_shift():
    # 2 sequences of 4 tokens; completion = last 2 tokens. Position t predicts token t+1, so the scored
    # log-probs are per_token[:, 1:3] for tokens 2 and 3.
    completion_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    per_token = t(-9.0, -1.0, -2.0, -5.0, -7.0, -3.0).reshape(2, 3)
    sums, counts = sequence_logps(per_token, completion_mask)
    assert sums.tolist() == [-1.0 + -2.0, -3.0]
    assert counts.tolist() == [2.0, 1.0]


def test_pair_metrics_by_hand():
    # beta 0.1: chosen reward 0.1 * (-10 - -12) = 0.2; rejected 0.1 * (-15 - -14) = -0.1; margin 0.3
    metrics = pair_metrics(t(-10.0, -5.0), t(-15.0, -5.0), t(-12.0, -5.0), t(-14.0, -5.0), beta=0.1)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.2, 0.0])
    assert metrics["rewards/rejected"].tolist() == pytest.approx([-0.1, 0.0])
    assert metrics["rewards/margins"].tolist() == pytest.approx([0.3, 0.0])
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]  # the tie counts as wrong (strict '>')
    assert metrics["logps/chosen"].tolist() == [-10.0, -5.0]  # the policy's sums, not means


def test_sigmoid_loss_by_hand():
    # delta = (-10 + 12) - (-15 + 14) = 3; loss = -log sigmoid(0.1 * 3) = log(1 + e^-0.3)
    loss = batch_loss(["sigmoid"], None, 0.1, t(-10.0), t(-15.0), t(-12.0), t(-14.0), t(4.0), t(5.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.3)))
    zero = batch_loss(["sigmoid"], None, 0.1, t(-3.0), t(-4.0), t(-3.0), t(-4.0), t(1.0), t(1.0))
    assert zero.item() == pytest.approx(math.log(2))  # policy == reference: ln 2, the frozen-loss signature


def test_sft_term_is_a_token_mean_over_the_batch():
    # two pairs, chosen sums -6 over 2 tokens and -3 over 4 tokens: sft = (6 + 3) / (2 + 4) = 1.5
    args = (t(-6.0, -3.0), t(-9.0, -9.0), t(-6.0, -3.0), t(-9.0, -9.0), t(2.0, 4.0), t(3.0, 3.0))
    sft = batch_loss(["sft"], None, 0.1, *args)
    assert sft.item() == pytest.approx(1.5)
    combined = batch_loss(["sigmoid", "sft"], [1.0, 0.5], 0.1, *args)
    assert combined.item() == pytest.approx(math.log(2) + 0.5 * 1.5)


def test_ipo_and_hinge_by_hand():
    # per-token log-ratios: chosen (+2)/4 = 0.5, rejected (-1)/5 = -0.2; ipo = (0.7 - 1/(2*0.1))^2 = (0.7 - 5)^2
    args = (t(-10.0), t(-15.0), t(-12.0), t(-14.0), t(4.0), t(5.0))
    assert batch_loss(["ipo"], None, 0.1, *args).item() == pytest.approx((0.7 - 5) ** 2)
    assert batch_loss(["hinge"], None, 0.1, *args).item() == pytest.approx(1 - 0.3)
    # aot: (policy chosen - rejected) - (ref chosen - rejected) = 5 - 2 = 3, sorted within the batch of one pair
    assert batch_loss(["aot"], None, 0.1, *args).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.3))))


def test_mean_of_batch_means_differs_from_the_mean_when_the_last_batch_is_short():
    assert mean_of_batch_means([1.0, 1.0, 1.0, 4.0], 3) == pytest.approx(2.5)
    assert mean_of_batch_means([1.0, 1.0, 1.0, 4.0], 2) == pytest.approx(1.75)  # equal batches: the plain mean
    assert sample_weighted_batch_mean([1.0, 4.0], [3, 1]) == pytest.approx(7 / 4)
