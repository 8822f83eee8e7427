"""MoCo v2 (He et al. 2020; Chen et al. 2020) around the U-Net encoder, after facebookresearch/moco's builder.py.

A query encoder (the segmentation model's encoder: the lean U-Net's `Encoder` or the EfficientNet-Lite0 trunk,
fundus_hemorrhage_training.model.build_encoder) + projection head (global average pool of the deepest level -> MLP -> `dim`),
a momentum key encoder (a copy that gets no gradient), and a queue of the last K keys as negatives.
Under DDP the keys are shuffled across processes before the key encoder (shuffled BN: a query and its key must
not share batch statistics) and every process's keys are enqueued (all_gather). On a single process the same is
simulated with `bn_groups` > 1: the queries go through the encoder in `bn_groups` contiguous groups (as if each
group were one process's batch), the keys in as many groups of a random permutation, then back in order.
Intra-batch BN does favour the positive, as the MoCo paper says (the GPU run's encoders, 256 held-out pairs:
retrieval top-1 0.082 with keys in the queries' batch composition, 0.039 shuffled; from ImageNet 0.715 and
0.547), but on CPU 2 groups of 16 did not learn faster than one batch of 32 in 500 steps (top1_batch 0.18 and
0.19), so `pretrain_moco --bn-groups` defaults to 1.

Both encoders run without stochastic depth (EfficientNet-Lite0's drop connect, which LiteEncoder applies in
training): as in facebookresearch/moco, whose ResNet has none, the key of an image must not be a random draw.
Measured on the random-init Lite0 (64-px crops): with drop connect 0.2 the same crop gave two keys of cosine 0.56,
barely above two different crops (0.39), and even with the key view equal to the query view top-1 reached only
0.36 after 300 steps (0.85 without it).

`stats` after each forward (no gradient), for the log: `top1_batch`, the positive ranked first among this batch's
own keys only (chance 1/N; neither stale queue entries nor batch statistics can help it), and
`queue_age_gap`, mean cos(q, queue key) for the newest quarter of the queue minus the oldest quarter. A gap
near 0 means the queue is consistent; a large gap means old keys are easy negatives because the key encoder
has moved since (momentum too low or learning rate too high for K / N steps of queue), and the queue's top-1 is
then partly a measure of that drift, not of the representation (the 2026-12 GPU run from random init: top-1
followed the learning rate, 0.13 at the peak, 0.01 at the end of the cosine schedule).

Only the query encoder is kept for fine-tuning (`pretrain_moco` saves its state_dict).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .model import DEFAULT_CHANNELS, build_encoder


class ProjectionHead(nn.Module):
    """Deepest encoder feature [N, C, h, w] -> global average pool [N, C] -> MLP -> [N, dim] (not normalised)."""

    def __init__(self, in_dim: int, dim: int = 128, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(in_dim, 2 * dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.mlp(deepest.mean(dim=(2, 3)))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfoNCE on L2-normalised queries q [N, C], positive keys k [N, C] and negatives queue [C, K].

    Returns (loss, logits [N, 1+K], labels [N]); the positive is column 0 of every row.
    """
    q, k = q.float(), k.float()  # logits / T in float32 even under bf16 autocast
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # [N, 1]
    l_neg = torch.einsum("nc,ck->nk", q, queue.clone().detach())  # [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [N, 1+K]
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # [N]
    return F.cross_entropy(logits, labels), logits, labels


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each of W processes -> [W * n, ...] on every process, in rank order. No gradient flows."""
    if not _distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class MoCo(nn.Module):
    """forward(im_q, im_k) -> (loss, logits [N, 1+K], labels [N]); updates the key encoder and the queue."""

    def __init__(self, encoder: tuple[int, ...] | dict = DEFAULT_CHANNELS, in_channels: int = 3, dim: int = 128,
                 queue_size: int = 4096, momentum: float = 0.99, temperature: float = 0.2, bn_groups: int = 1):
        """`encoder`: the lean encoder's widths, or a model config for fundus_hemorrhage_training.model.build_encoder (with
        "imagenet": True, an efficientnet-lite0 encoder starts from the ImageNet weights). `bn_groups`: simulated
        shuffled BN on a single process (ignored under DDP, which shuffles across processes)."""
        super().__init__()
        if bn_groups < 1:
            raise ValueError("bn_groups must be >= 1")
        encoder_config = (dict(encoder) if isinstance(encoder, dict)
                          else {"channels": list(encoder), "in_channels": in_channels})
        self.config = {**encoder_config, "dim": dim, "queue_size": queue_size, "momentum": momentum,
                       "temperature": temperature, "bn_groups": bn_groups}
        self.K, self.m, self.T, self.bn_groups = queue_size, momentum, temperature, bn_groups
        self.stats: dict[str, float] = {}

        self.encoder_q = build_encoder(encoder_config)
        if hasattr(self.encoder_q, "drop_connect_rate"):
            self.encoder_q.drop_connect_rate = 0.0  # no stochastic depth in either encoder (module docstring)
        self.head_q = ProjectionHead(self.encoder_q.channels[-1], dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.head_k = copy.deepcopy(self.head_q)
        for p in self.key_parameters():
            p.requires_grad = False  # updated by momentum only

        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # [dim, K]
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # next column to overwrite

    def query_parameters(self):
        yield from self.encoder_q.parameters()
        yield from self.head_q.parameters()

    def key_parameters(self):
        yield from self.encoder_k.parameters()
        yield from self.head_k.parameters()

    def embed_query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head_q(self.encoder_q(x)[-1]), dim=1)  # [N, dim]

    def embed_key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head_k(self.encoder_k(x)[-1]), dim=1)  # [N, dim]

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """key = m * key + (1 - m) * query, parameter by parameter (BN running stats are the key's own)."""
        for p_q, p_k in zip(self.query_parameters(), self.key_parameters()):
            p_k.mul_(self.m).add_(p_q.detach(), alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest columns with every process's keys [N, dim] (normalised); the pointer wraps."""
        keys = concat_all_gather(keys)  # [W * N, dim]
        n = keys.shape[0]
        if n > self.K:
            keys, n = keys[-self.K:], self.K
        ptr = int(self.queue_ptr)
        cols = (ptr + torch.arange(n, device=self.queue.device)) % self.K
        self.queue[:, cols] = keys.T.to(self.queue.dtype)  # [dim, n]
        self.queue_ptr[0] = (ptr + n) % self.K

    @staticmethod
    def _grouped(embed, x: torch.Tensor, groups: int) -> torch.Tensor:
        """embed(x) with BN statistics per contiguous group of the batch (as `groups` processes would see it)."""
        if groups <= 1 or x.shape[0] < 2 * groups:
            return embed(x)
        return torch.cat([embed(part) for part in x.chunk(groups)], dim=0)

    def _embed_key_grouped(self, im_k: torch.Tensor, groups: int) -> torch.Tensor:
        """Single-process shuffled BN: keys [N, dim] of im_k, each computed in a group of a random permutation of
        the batch, returned in the batch's order."""
        if groups <= 1 or im_k.shape[0] < 2 * groups:
            return self.embed_key(im_k)
        idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
        idx_unshuffle = torch.argsort(idx_shuffle)
        return self._grouped(self.embed_key, im_k[idx_shuffle], groups)[idx_unshuffle]

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shuffle the global batch across processes (for shuffled BN); returns this process's share [N, ...]
        and the index that undoes the shuffle. Single process: x unchanged, no index."""
        if not _distributed():
            return x, None
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)  # [W * N, ...]
        batch_size_all = x_gather.shape[0]
        num_processes = batch_size_all // batch_size_this
        idx_shuffle = torch.randperm(batch_size_all, device=x.device)
        dist.broadcast(idx_shuffle, src=0)  # every process uses rank 0's permutation
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(num_processes, -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
        """Undo _batch_shuffle_ddp on the keys [N, dim]: this process gets the keys of its own views back."""
        if idx_unshuffle is None:
            return x
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)  # [W * N, dim]
        num_processes = x_gather.shape[0] // batch_size_this
        idx_this = idx_unshuffle.view(num_processes, -1)[dist.get_rank()]
        return x_gather[idx_this]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """im_q, im_k: two augmented views [N, 3, P, P] of the same crops."""
        groups = 1 if _distributed() else self.bn_groups
        q = self._grouped(self.embed_query, im_q, groups)  # [N, dim]
        with torch.no_grad():
            self._momentum_update_key_encoder()
            if _distributed():
                im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
                k = self._batch_unshuffle_ddp(self.embed_key(im_k), idx_unshuffle)  # [N, dim]
            else:
                k = self._embed_key_grouped(im_k, groups)  # [N, dim]
        loss, logits, labels = info_nce(q, k, self.queue, self.T)  # logits [N, 1+K]
        self.stats = self._diagnostics(q.detach(), k, logits.detach())
        self._dequeue_and_enqueue(k)
        return loss, logits, labels

    @torch.no_grad()
    def _diagnostics(self, q: torch.Tensor, k: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
        """top1_batch and queue_age_gap (module docstring), from this step's q, k and logits (queue before enqueue)."""
        n = q.shape[0]
        top1_batch = (q.float() @ k.float().T).argmax(dim=1).eq(torch.arange(n, device=q.device)).float().mean()
        age = (int(self.queue_ptr) - 1 - torch.arange(self.K, device=logits.device)) % self.K  # 0: newest
        cos = logits[:, 1:] * self.T  # [N, K] cos(q, queue)
        quarter = max(1, self.K // 4)
        gap = cos[:, age < quarter].mean() - cos[:, age >= self.K - quarter].mean()
        return {"top1_batch": float(top1_batch), "queue_age_gap": float(gap)}
