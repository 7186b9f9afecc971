"""Losses of the embedding methods, per image, in plain torch.

- ``lovasz_hinge``: the Lovasz extension of the Jaccard loss applied to hinge errors (Berman,
  Rannen Triki, Blaschko, CVPR 2018), for one binary map.
- ``spatial_embedding_loss``: SpatialEmbeddings (Neven et al., CVPR 2019).
- ``discriminative_loss``: pull / push / regularisation (De Brabandere et al., 2017).

Instance masks are bool [N, H, W] on the same grid as the predictions.
"""

from __future__ import annotations

import torch


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted in decreasing
    order; ``gt_sorted`` float [P] (1 = foreground) in that order -> [P]."""
    gts = gt_sorted.sum()
    inter = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jac = 1.0 - inter / union
    if jac.numel() > 1:
        jac = torch.cat([jac[:1], jac[1:] - jac[:-1]])
    return jac


def lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge of one map: ``logits`` float [P] (any real, > 0 = foreground), ``labels``
    bool/float [P]. Zero when every foreground logit >= 1 and every background logit <= -1."""
    labels = labels.to(logits.dtype).flatten()
    logits = logits.flatten()
    if logits.numel() == 0:
        return logits.sum() * 0.0
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    return torch.dot(torch.relu(errors_sorted), lovasz_grad(labels[perm]))


def coordinate_map(height: int, width: int, scale: float, device=None) -> torch.Tensor:
    """[2, H, W] pixel coordinates (x, y) of pixel centres, divided by ``scale`` (pixels per unit)."""
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / scale
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / scale
    return torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)])


def gaussian_membership(emb: torch.Tensor, centre: torch.Tensor, sigma_raw: torch.Tensor) -> torch.Tensor:
    """phi = exp(-sum_d (e_d - c_d)^2 * exp(10 * s_d)): ``emb`` [2, ...], ``centre`` [2],
    ``sigma_raw`` [n_sigma] (1 or 2; one value is shared by x and y) -> [...] in (0, 1]."""
    s = torch.exp(10.0 * sigma_raw).expand(2)
    shape = (2,) + (1,) * (emb.dim() - 1)
    return torch.exp(-(((emb - centre.view(shape)) ** 2) * s.view(shape)).sum(0))


def spatial_embedding_loss(
    offsets: torch.Tensor,
    sigma: torch.Tensor,
    seed: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    *,
    coord_scale: float,
    fg_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """SpatialEmbeddings loss of one image.

    ``offsets`` float [2, H, W] in embedding units (already tanh'd), ``sigma`` raw [n_sigma, H, W],
    ``seed`` probabilities [C, H, W] (sigmoid'd), ``masks`` bool [N, H, W], ``labels`` int64 [N]
    (1-based classes). Each instance k has centre c_k = the mean pixel coordinate of its mask and
    bandwidth s_k = the mean of ``sigma`` over its mask; phi_k(e) = exp(-sum (e - c_k)^2 exp(10 s_k)).
    Returns unweighted ``instance`` (Lovasz hinge of 2 phi_k - 1 against mask k, mean over
    instances), ``var`` (spread of sigma inside each mask, mean over instances) and ``seed``
    (per pixel squared error: 0 on background, phi_k on instance pixels of the instance's class
    channel; mean over pixels).
    """
    _, h, w = offsets.shape
    xy = coordinate_map(h, w, coord_scale, offsets.device)
    emb = xy + offsets
    seed_target = torch.zeros_like(seed)
    seed_weight = torch.ones_like(seed)
    inst_loss = offsets.sum() * 0.0
    var_loss = sigma.sum() * 0.0
    n = 0
    for k in range(masks.shape[0]):
        m = masks[k]
        if not m.any():
            continue
        centre = xy[:, m].mean(1)
        s_pix = sigma[:, m]  # [n_sigma, P]
        s_k = s_pix.mean(1)
        var_loss = var_loss + ((s_pix - s_k.detach()[:, None]) ** 2).mean()
        phi = gaussian_membership(emb, centre, s_k)  # [H, W]
        inst_loss = inst_loss + lovasz_hinge(2.0 * phi - 1.0, m)
        c = int(labels[k]) - 1
        seed_target[c][m] = phi[m].detach()
        seed_weight[c][m] = fg_weight
        n += 1
    seed_loss = (seed_weight * (seed - seed_target) ** 2).sum() / (h * w)
    n = max(n, 1)
    return {"instance": inst_loss / n, "var": var_loss / n, "seed": seed_loss}


def discriminative_loss(
    emb: torch.Tensor, masks: torch.Tensor, *, delta_v: float, delta_d: float, origin: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Discriminative loss of one image: ``emb`` float [D, H, W], ``masks`` bool [N, H, W].

    With mu_c the mean embedding of instance c:
    ``var`` = mean_c mean_{i in c} max(0, |mu_c - e_i| - delta_v)^2 (pull),
    ``dist`` = mean_{c != c'} max(0, 2 delta_d - |mu_c - mu_c'|)^2 (push; 0 with < 2 instances),
    ``reg`` = mean_c |mu_c - o_c|, o_c the mean of ``origin`` [D, H, W] over instance c (default
    0; a fixed part of the embedding, e.g. pixel coordinates, is not regularised). Unweighted;
    all zero when there is no instance.
    """
    zero = emb.sum() * 0.0
    keep = [k for k in range(masks.shape[0]) if masks[k].any()]
    if not keep:
        return {"var": zero, "dist": zero, "reg": zero}
    means, var, reg = [], zero, zero
    for k in keep:
        e = emb[:, masks[k]]  # [D, P]
        mu = e.mean(1)
        means.append(mu)
        var = var + torch.relu((e - mu[:, None]).norm(dim=0) - delta_v).pow(2).mean()
        reg = reg + (mu if origin is None else mu - origin[:, masks[k]].mean(1)).norm()
    mus = torch.stack(means)  # [N, D]
    n = len(keep)
    reg = reg / n
    if n > 1:
        diff = mus[:, None, :] - mus[None, :, :]
        d = (diff.pow(2).sum(-1) + 1e-12).sqrt()  # eps: sqrt has no gradient at 0
        off = ~torch.eye(n, dtype=torch.bool, device=emb.device)
        dist = torch.relu(2.0 * delta_d - d[off]).pow(2).mean()
    else:
        dist = zero
    return {"var": var / n, "dist": dist, "reg": reg}
