"""Training package, unit level: MoCo's queue, momentum encoder and loss; the metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fundus_hemorrhage_training.metrics import SegmentationScores, average_precision_from_histograms, lesion_matches
from fundus_hemorrhage_training.model import Encoder
from fundus_hemorrhage_training.moco import MoCo, info_nce


# ----------------------------------------------------------------------------------------------------- MoCo

def tiny_moco(**kw) -> MoCo:
    torch.manual_seed(0)
    return MoCo((4, 8, 8), dim=8, **kw)


def test_moco_queue_pointer_wraps_and_stores_keys():
    moco = tiny_moco(queue_size=10)
    assert moco.queue.shape == (8, 10) and int(moco.queue_ptr) == 0
    batches = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(3)]
    moco._dequeue_and_enqueue(batches[0])
    assert int(moco.queue_ptr) == 4
    torch.testing.assert_close(moco.queue[:, 0:4], batches[0].T, rtol=0, atol=0)
    moco._dequeue_and_enqueue(batches[1])
    assert int(moco.queue_ptr) == 8
    moco._dequeue_and_enqueue(batches[2])  # columns 8, 9, then wraps to 0, 1
    assert int(moco.queue_ptr) == 2
    torch.testing.assert_close(moco.queue[:, [8, 9, 0, 1]], batches[2].T, rtol=0, atol=0)
    torch.testing.assert_close(moco.queue[:, 2:4], batches[0].T[:, 2:4], rtol=0, atol=0)
    torch.testing.assert_close(moco.queue[:, 4:8], batches[1].T, rtol=0, atol=0)


def test_moco_forward_enqueues_normalised_keys_of_the_key_encoder():
    moco = tiny_moco(queue_size=16).train()
    im_q, im_k = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    loss, logits, labels = moco(im_q, im_k)
    assert logits.shape == (4, 1 + 16) and labels.tolist() == [0] * 4 and torch.isfinite(loss)
    assert int(moco.queue_ptr) == 4
    with torch.no_grad():
        expected = moco.embed_key(im_k)  # same batch in train mode: same BN statistics
    torch.testing.assert_close(moco.queue[:, :4], expected.T)
    torch.testing.assert_close(moco.queue[:, :4].norm(dim=0), torch.ones(4))


def test_moco_momentum_update_and_no_gradient_to_key_encoder():
    moco = tiny_moco(momentum=0.9)
    with torch.no_grad():  # make query and key differ
        for p in moco.query_parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in moco.key_parameters()]
    query = [p.clone() for p in moco.query_parameters()]
    moco._momentum_update_key_encoder()
    for k0, q, k1 in zip(before, query, moco.key_parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q)
        assert not torch.equal(k1, k0)
    assert all(not p.requires_grad for p in moco.key_parameters())
    assert all(p.requires_grad for p in moco.query_parameters())
    loss, _, _ = moco(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None for p in moco.key_parameters())
    assert all(p.grad is not None for p in moco.query_parameters())
    assert not moco.queue.requires_grad


def test_info_nce_aligned_pairs_beat_random():
    n, c, k = 4, 16, 8
    q = torch.eye(c)[:n]  # [N, C] unit vectors
    queue = torch.eye(c)[n:n + k].T  # [C, K] orthogonal to every query
    aligned, logits, labels = info_nce(q, q.clone(), queue, temperature=0.2)
    assert logits.shape == (n, 1 + k) and labels.shape == (n,)
    torch.manual_seed(0)
    rq, rk = F.normalize(torch.randn(n, c), dim=1), F.normalize(torch.randn(n, c), dim=1)
    random_loss, _, _ = info_nce(rq, rk, F.normalize(torch.randn(c, k), dim=0), temperature=0.2)
    assert aligned < random_loss
    # Exact value: the positive at 1/T, every negative at 0.
    expected = -torch.log(torch.exp(torch.tensor(5.0)) / (torch.exp(torch.tensor(5.0)) + k))
    torch.testing.assert_close(aligned, expected)


# -------------------------------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_from_histograms_matches_sklearn(seed):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    labels = rng.random(20000) < 0.05
    # Ties everywhere (256 levels) and some signal, as for served uint8 probabilities.
    scores = np.clip(rng.integers(0, 256, labels.size) + labels * rng.integers(0, 120, labels.size), 0, 255)
    scores = scores.astype(np.uint8)
    pos = np.bincount(scores[labels], minlength=256)
    neg = np.bincount(scores[~labels], minlength=256)
    assert abs(average_precision_from_histograms(pos, neg) - average_precision_score(labels, scores)) < 1e-9
    pure_noise = rng.integers(0, 256, labels.size).astype(np.uint8)
    pos, neg = np.bincount(pure_noise[labels], minlength=256), np.bincount(pure_noise[~labels], minlength=256)
    assert abs(average_precision_from_histograms(pos, neg) - average_precision_score(labels, pure_noise)) < 1e-9


def test_lesion_matches_and_dice_on_hand_built_masks():
    truth = np.zeros((20, 20), np.uint8)
    truth[2:4, 2:4] = 1  # lesion A, 4 px
    truth[10:12, 10:12] = 1  # lesion B, 4 px (missed)
    pred = np.zeros_like(truth)
    pred[3:5, 2:4] = 1  # overlaps A by 2 px
    pred[15:17, 15:16] = 1  # false positive
    pred[0, 19] = 1  # another false positive
    assert lesion_matches(truth, pred) == (1, 2, 1, 3)
    assert lesion_matches(truth, np.zeros_like(truth)) == (0, 2, 0, 0)

    fov = np.ones_like(truth)
    fov[0, :] = 0  # the lone corner prediction is outside the FOV
    scores = SegmentationScores()
    prob8 = (pred * 200).astype(np.uint8)
    scores.add(prob8, truth, fov, pred)
    s = scores.summary()
    # |pred & truth| = 2; |pred| (inside FOV) = 4 + 2; |truth| = 8 -> Dice 4 / 14.
    assert s["dice"] == pytest.approx(4 / 14) and s["dice_mean"] == pytest.approx(4 / 14)
    assert (s["lesions_true"], s["lesions_predicted"]) == (2, 2)
    assert s["lesion_sensitivity"] == 0.5 and s["lesion_precision"] == 0.5
    perfect = SegmentationScores()
    perfect.add((truth * 255).astype(np.uint8), truth, np.ones_like(truth), truth)
    assert perfect.summary()["dice"] == 1.0 and perfect.summary()["pixel_aupr"] == 1.0
    assert perfect.best_threshold()[1] == 1.0
