"""Inference-time clustering of the embedding methods, for one image, in torch.

Both return a list of ``Cluster``: the pixel indices (flat, row-major in the H x W map) of one
instance, its score and class, and a per-pixel membership probability over a local window,
from which the adapters build RLE masks and box-frame soft masks. Clusters never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from segpipe.modeling.embed_losses import coordinate_map, gaussian_membership


@dataclass
class Cluster:
    ys: np.ndarray  # int64 [P] pixel rows
    xs: np.ndarray  # int64 [P] pixel columns
    score: float
    label: int  # 1-based class
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 of ``prob`` in the image (integer, half-open)
    prob: np.ndarray  # float32 [y1 - y0, x1 - x0] membership probability in the window


def window(ys: np.ndarray, xs: np.ndarray, h: int, w: int, margin: int = 2) -> tuple[int, int, int, int]:
    """The pixel window (x0, y0, x1, y1; half-open) around pixels ``ys``, ``xs`` plus ``margin``, clipped to h x w."""
    return (max(int(xs.min()) - margin, 0), max(int(ys.min()) - margin, 0),
            min(int(xs.max()) + 1 + margin, w), min(int(ys.max()) + 1 + margin, h))


def cluster_spatial(
    offsets: torch.Tensor,
    sigma: torch.Tensor,
    seed: torch.Tensor,
    *,
    coord_scale: float,
    fg_thresh: float = 0.5,
    seed_thresh: float = 0.5,
    min_pixels: int = 8,
    max_instances: int = 1000,
) -> list[Cluster]:
    """SpatialEmbeddings inference on one image (Neven et al., 2019).

    ``offsets`` [2, H, W] (tanh'd, embedding units), ``sigma`` raw [n_sigma, H, W], ``seed``
    probabilities [C, H, W]. Foreground = pixels whose best seediness exceeds ``fg_thresh``.
    Repeatedly take the unclaimed foreground pixel with the highest seediness (stop below
    ``seed_thresh``), use its embedding as the centre and its sigma as the bandwidth, and claim
    the unclaimed foreground pixels with membership phi > 0.5. A proposal is kept when it has at
    least ``min_pixels`` pixels and more than half of it was unclaimed. Score = the seed's
    seediness; class = the channel with the largest seediness summed over the instance (a vote,
    steadier than the seed pixel alone); soft mask = phi on foreground pixels.
    """
    _, h, w = offsets.shape
    emb = coordinate_map(h, w, coord_scale, offsets.device) + offsets
    best = seed.max(0).values
    fg = best > fg_thresh
    idx = torch.nonzero(fg.flatten()).squeeze(1)
    if idx.numel() == 0:
        return []
    e = emb.flatten(1)[:, idx]  # [2, F]
    s = sigma.flatten(1)[:, idx]
    sv = best.flatten()[idx]
    free = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
    out: list[Cluster] = []
    while len(out) < max_instances:
        cand = torch.where(free, sv, torch.full_like(sv, -1.0))
        j = int(cand.argmax())
        if float(cand[j]) < seed_thresh:
            break
        phi = gaussian_membership(e, e[:, j], s[:, j])  # [F]
        prop = phi > 0.5
        prop[j] = True
        n_prop = int(prop.sum())
        claim = prop & free
        n_claim = int(claim.sum())
        free &= ~prop
        if n_prop < min_pixels or n_claim * 2 <= n_prop or n_claim < min_pixels:
            continue
        flat = idx[claim].cpu().numpy()
        ys, xs = flat // w, flat % w
        x0, y0, x1, y1 = window(ys, xs, h, w)
        local = gaussian_membership(emb[:, y0:y1, x0:x1], e[:, j], s[:, j]) * fg[y0:y1, x0:x1]
        votes = seed.flatten(1)[:, idx[claim]].sum(1)  # [C] seediness summed over the instance
        out.append(Cluster(ys=ys, xs=xs, score=float(sv[j]), label=int(votes.argmax()) + 1,
                           window=(x0, y0, x1, y1), prob=local.float().cpu().numpy()))
    return out


def cluster_discriminative(
    emb: torch.Tensor,
    class_probs: torch.Tensor,
    *,
    delta_v: float,
    delta_d: float,
    fg_thresh: float = 0.5,
    bandwidth: float | None = None,
    radius: float | None = None,
    shift_iters: int = 10,
    split_components: bool = True,
    min_pixels: int = 8,
    max_instances: int = 1000,
) -> list[Cluster]:
    """Discriminative-loss inference on one image (De Brabandere et al., 2017).

    ``emb`` [D, H, W]; ``class_probs`` [C + 1, H, W] softmax over background (channel 0) and
    classes. Foreground = pixels with background probability below 1 - ``fg_thresh``.
    Repeatedly start at the unclaimed foreground pixel with the highest foreground probability,
    mean-shift its embedding to the local mode (radius ``bandwidth``, default ``delta_d``), and
    claim the unclaimed foreground pixels within ``radius`` (default ``delta_d``) of the mode
    (after training, pixels lie within ``delta_v`` of their mean and means ``2 delta_d`` apart,
    so a threshold between the two separates them). With ``split_components`` a claimed cluster
    is split into 4-connected components: a fully convolutional net gives look-alike objects far
    apart the same embedding, and the components tell them apart (off: an occluded object's
    visible parts stay one instance). Parts of at least ``min_pixels`` become instances.
    Score = mean foreground probability x mean membership, with membership
    m_i = sigmoid((radius - |e_i - mode|) / (delta_v / 2)); class = the class with the largest
    summed probability; soft mask = foreground probability x membership.
    """
    d, h, w = emb.shape
    bw = bandwidth or delta_d
    rad = radius or delta_d
    fg_prob = 1.0 - class_probs[0]
    fg = fg_prob > fg_thresh
    idx = torch.nonzero(fg.flatten()).squeeze(1)
    if idx.numel() == 0:
        return []
    e = emb.flatten(1)[:, idx].T.contiguous()  # [F, D]
    fp = fg_prob.flatten()[idx]
    free = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
    out: list[Cluster] = []
    tau = delta_v / 2.0
    while len(out) < max_instances and bool(free.any()):
        j = int(torch.where(free, fp, torch.full_like(fp, -1.0)).argmax())
        mode = e[j]
        for _ in range(shift_iters):
            near = free & ((e - mode).norm(dim=1) < bw)
            if not near.any():
                break
            new = e[near].mean(0)
            if float((new - mode).norm()) < 1e-3:
                mode = new
                break
            mode = new
        dist = (e - mode).norm(dim=1)
        claim = free & (dist < rad)
        claim[j] = True  # j is free: progress is guaranteed
        free &= ~claim
        flat = idx[claim].cpu().numpy()
        if flat.size < min_pixels:
            continue
        ys_all, xs_all = flat // w, flat % w
        x0, y0, x1, y1 = window(ys_all, xs_all, h, w)
        grid = np.zeros((y1 - y0, x1 - x0), bool)
        grid[ys_all - y0, xs_all - x0] = True
        comps = ndimage.label(grid)[0] if split_components else grid.astype(np.int32)
        win_emb = emb[:, y0:y1, x0:x1]
        member = torch.sigmoid((rad - (win_emb - mode[:, None, None]).norm(dim=0)) / tau)
        soft = (member * fg_prob[y0:y1, x0:x1]).float().cpu().numpy()
        member_np = member.float().cpu().numpy()
        fp_np = fg_prob[y0:y1, x0:x1].float().cpu().numpy()
        cp_np = class_probs[1:, y0:y1, x0:x1].float().cpu().numpy()
        for c, (ly, lx) in sorted(ndimage.value_indices(comps, ignore_value=0).items()):  # one pass over the window
            if ly.size < min_pixels or len(out) >= max_instances:
                continue
            ys, xs = ly + y0, lx + x0
            cx0, cy0, cx1, cy1 = window(ys, xs, h, w)
            score = float(fp_np[ly, lx].mean() * member_np[ly, lx].mean())
            label = int(cp_np[:, ly, lx].sum(1).argmax()) + 1
            out.append(Cluster(ys=ys, xs=xs, score=score, label=label, window=(cx0, cy0, cx1, cy1),
                               prob=soft[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].copy()))
    return out
