"""RSIS: recurrent instance segmentation (Salvador, Bellver, Campos, Baradad, Marques, Torres,
Giro-i-Nieto, "Recurrent Neural Networks for Semantic Instance Segmentation", 2017).

An encoder runs once per image; then a recurrent decoder emits one instance per step. Per step,
a hierarchy of ConvLSTMs (``RSISParams.lstm_channels``, coarsest encoder stride first) reads the
encoder skip at its stride, the upsampled output of the level above and (``feed_canvas``) the
union of the masks emitted so far; a refinement on the first encoder level's features (stride
2) turns the finest hidden state into the step's mask logits, upsampled to the image; a class
head and a stop head read the max-pooled hidden states.

Training (``rsis_loss``): with N ground-truth instances the decoder runs min(N + 1, max_steps)
steps; the first min(N, steps) masks are matched to the ground truth by the Hungarian algorithm
on soft IoU; the loss of a matched pair is 1 - soft IoU plus a pixel BCE (not in the paper: from scratch on a
CPU budget the soft IoU alone leaves the first steps as blobs over several objects) and the class
cross-entropy; step t's stop target is 1 when t >= N (no object left), else 0.

Inference: steps run until the stop probability reaches ``stop_thresh`` or ``max_steps`` (the
bound: objects past it are not found). A step's instance is its mask above ``mask_thresh``
minus the pixels earlier steps took; it is dropped below ``min_pixels`` or when more than half
of it was taken already (a repeat). Score = (1 - stop probability) x mean mask probability over
the instance (x class probability); instances never overlap.

Differences from the paper, for CPU budgets: a small BN encoder instead of ResNet-101; the
canvas input (from Ren and Zemel's recurrent attention, CVPR 2017), which tells each step what
has been covered without relying on the LSTM memory alone; and (``foreground``) a foreground head
on the encoder, trained by BCE to the union of the instances, whose not-yet-covered part
(foreground x (1 - canvas), detached) is a further input of every step and, as its max and mean,
of the stop head: "what is left" is then read, not remembered, and the step count generalises
from training crops to larger images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from segpipe.config import ModelCard, RSISParams
from segpipe.modeling.batching import pad_batch
from segpipe.modeling.embed_cluster import Cluster, window
from segpipe.modeling.embednet import ClusterAdapter, encoder, pad_masks
from segpipe.modeling.instance_classifier import make_classifier
from segpipe.modeling.registry import register


# --- pure pieces: matching, losses, the stop rule ---------------------------------------------


def soft_iou(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Soft IoU of every prediction with every mask: ``probs`` float [K, P] in [0, 1], ``masks``
    float [N, P] in {0, 1} -> [K, N], sum(p g) / sum(p + g - p g)."""
    inter = probs @ masks.T
    union = probs.sum(1)[:, None] + masks.sum(1)[None, :] - inter
    return inter / union.clamp(min=1e-6)


def hungarian_match(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of a [K, N] cost matrix -> (rows, cols), min(K, N)
    pairs, rows increasing."""
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def stop_targets(n_steps: int, n_objects: int) -> torch.Tensor:
    """float [n_steps]: 1 at steps t >= n_objects (nothing left to segment), else 0."""
    return (torch.arange(n_steps) >= n_objects).float()


def steps_before_stop(stop_probs: Sequence[float], thresh: float) -> int:
    """The number of steps whose instances count: the index of the first step whose stop
    probability reaches ``thresh`` (all steps when none does)."""
    for t, p in enumerate(stop_probs):
        if p >= thresh:
            return t
    return len(stop_probs)


def order_ranks(masks: torch.Tensor) -> torch.Tensor:
    """bool [N, H, W] -> int64 [N]: each instance's place when sorted by centroid row, then column."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    m = masks.flatten(1).float()
    area = m.sum(1).clamp(min=1.0)
    ys = torch.arange(masks.shape[1], dtype=torch.float32, device=masks.device).repeat_interleave(masks.shape[2])
    xs = torch.arange(masks.shape[2], dtype=torch.float32, device=masks.device).repeat(masks.shape[1])
    cy, cx = (m @ ys) / area, (m @ xs) / area
    order = sorted(range(n), key=lambda j: (float(cy[j]), float(cx[j])))
    ranks = torch.empty(n, dtype=torch.int64)
    ranks[torch.as_tensor(order)] = torch.arange(n)
    return ranks


def rsis_loss(mask_logits: torch.Tensor, class_logits: torch.Tensor | None, stop_logits: torch.Tensor,
              masks: torch.Tensor, labels: torch.Tensor, pointer_logits: torch.Tensor | None = None,
              order_prior: float = 0.0) -> dict[str, torch.Tensor]:
    """Set loss of one image. ``mask_logits`` [T, H, W], ``class_logits`` [T, C] or None,
    ``stop_logits`` [T]; ground truth ``masks`` bool [N, H, W], ``labels`` 1-based [N].
    The first min(N, T) steps are Hungarian-matched to the instances on soft IoU. Returns
    unweighted ``mask`` (mean 1 - soft IoU over matched pairs), ``class`` (mean cross-entropy
    over matched pairs; 0 without a class head), ``bce`` (mean pixel BCE of matched pairs),
    ``stop`` (mean BCE against ``stop_targets``) and ``pointer`` (with ``pointer_logits`` [T, h, w]:
    mean cross-entropy of each matched step's spatial softmax against its object's mask pooled
    to h x w and normalised to sum 1; else 0). ``order_prior`` adds |t - rank| / N to the matching
    cost of step t and the object of that rank (``order_ranks``)."""
    t_steps = mask_logits.shape[0]
    zero = mask_logits.sum() * 0.0
    stop = F.binary_cross_entropy_with_logits(stop_logits, stop_targets(t_steps, masks.shape[0]).to(stop_logits.device))
    k = min(masks.shape[0], t_steps)
    if k == 0:
        return {"mask": zero, "bce": zero, "class": zero, "stop": stop, "pointer": zero}
    probs = torch.sigmoid(mask_logits[:k]).flatten(1)
    gt = masks.flatten(1).to(probs.dtype)
    iou = soft_iou(probs, gt)  # [k, N]
    cost = (1.0 - iou).detach().cpu().numpy()
    if order_prior > 0:
        ranks = order_ranks(masks).numpy()
        cost = cost + order_prior * np.abs(np.arange(k)[:, None] - ranks[None, :]) / masks.shape[0]
    rows, cols = hungarian_match(cost)
    rows_t, cols_t = torch.as_tensor(rows, device=iou.device), torch.as_tensor(cols, device=iou.device)
    mask_loss = (1.0 - iou[rows_t, cols_t]).mean()
    bce = F.binary_cross_entropy_with_logits(mask_logits[:k].flatten(1)[rows_t], gt[cols_t])
    cls = zero if class_logits is None else F.cross_entropy(class_logits[rows_t], labels.to(iou.device)[cols_t] - 1)
    ptr = zero
    if pointer_logits is not None:
        target = F.adaptive_avg_pool2d(gt.reshape(-1, 1, *masks.shape[-2:])[cols_t], pointer_logits.shape[-2:]).flatten(1)
        target = target / target.sum(1, keepdim=True).clamp(min=1e-6)
        ptr = -(target * F.log_softmax(pointer_logits[:k].flatten(1)[rows_t], dim=1)).sum(1).mean()
    return {"mask": mask_loss, "bce": bce, "class": cls, "stop": stop, "pointer": ptr}


def interior_cells(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """bool [N, H, W] -> int64 [N]: the flat index, on an h x w ``grid`` over the image, of each
    instance's most interior pixel (the maximum of its distance transform; a ring's lies on the
    ring, not in its hole). Empty instances get cell 0."""
    from scipy.ndimage import distance_transform_edt

    n, hh, ww = masks.shape
    gh, gw = grid
    out = torch.zeros(n, dtype=torch.int64)
    arr = masks.cpu().numpy()
    for j in range(n):
        if not arr[j].any():
            continue
        dist = distance_transform_edt(np.pad(arr[j], 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        out[j] = min(y * gh // hh, gh - 1) * gw + min(x * gw // ww, gw - 1)
    return out


def set_pointer_loss(pointer_logits: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """-log of the spatial softmax mass on any of ``cells`` (int64 [K], K >= 1): pointing at any
    remaining object is right. ``pointer_logits`` [h, w]."""
    logp = F.log_softmax(pointer_logits.flatten(), 0)
    return -torch.logsumexp(logp[cells], 0)


# --- the network -------------------------------------------------------------------------------


class ConvLSTMCell(nn.Module):
    """ConvLSTM (Shi et al., 2015) with one 3x3 conv for the four gates. ``forward(x [B, Cin, H, W],
    state (h, c) or None) -> (h, c)``, each [B, hidden, H, W]."""

    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(cin + hidden, 4 * hidden, 3, padding=1)
        with torch.no_grad():
            self.gates.bias.zero_()
            self.gates.bias[hidden : 2 * hidden].fill_(1.0)  # forget gate open at the start

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None):
        if state is None:
            zeros = x.new_zeros((x.shape[0], self.hidden, x.shape[2], x.shape[3]))
            state = (zeros, zeros)
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class RSISNet(nn.Module):
    """``forward(images, targets=None)``: images a list of float [3, H, W] in [0, 1]. Training mode
    with targets (``masks`` uint8 [N, H, W], ``labels`` int64 [N], 1-based) returns the loss dict;
    eval mode returns per image a list of ``Cluster`` (at most ``max_steps``)."""

    def __init__(self, params: RSISParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        ch = list(params.channels)
        self.down, self.context = encoder(params)
        canvas = (1 if params.feed_canvas else 0) + (1 if params.foreground else 0)
        self.levels = len(params.lstm_channels)
        # Encoder outputs read by the LSTM levels, squeezed once per image by 1x1 convs so the
        # per-step gate convolutions stay cheap.
        self.skip_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch[len(ch) - 1 - i], hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True))
            for i, hid in enumerate(params.lstm_channels))
        ptr = 1 if params.pointer else 0
        self.cells = nn.ModuleList()
        above = 0
        for i, hid in enumerate(params.lstm_channels):
            self.cells.append(ConvLSTMCell(hid + above + canvas + (ptr if i > 0 else 0), hid))
            above = hid
        # The pointer: a spatial softmax over the coarsest level, which also sees pixel coordinates.
        self.pointer_head = nn.Conv2d(params.lstm_channels[0] + 2, 1, 1) if params.pointer else None
        fr = params.full_res_channels
        self.to_fine = nn.Conv2d(above, fr, 1)
        self.refine = nn.Sequential(nn.Conv2d(fr + ch[0] + canvas + ptr, fr, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(fr, 1, 1))
        pooled = sum(params.lstm_channels)
        # Foreground logits at stride 2 from the fine features and every projected skip.
        self.fg_head = (nn.Sequential(nn.Conv2d(ch[0] + pooled, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 1, 1))
                        if params.foreground else None)
        self.classifier = make_classifier(params, num_classes)
        self.class_head = nn.Linear(pooled, num_classes) if self.classifier is None and num_classes > 1 else None
        self.stop_head = nn.Linear(pooled + (2 if params.foreground else 0), 1)
        self.multiple = max(16, 2 ** len(ch))

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Normalised padded images [B, 3, Hp, Wp] -> (projected encoder outputs for the LSTM
        levels, coarse to fine; the stride-2 features [B, channels[0], Hp/2, Wp/2]; foreground
        logits [B, 1, Hp/2, Wp/2] or None without ``foreground``)."""
        outs = []
        y = x
        for stage in self.down:
            y = stage(y)
            outs.append(y)
        outs[-1] = self.context(outs[-1])
        skips = [proj(outs[len(outs) - 1 - i]) for i, proj in enumerate(self.skip_proj)]
        fg = None
        if self.fg_head is not None:
            size = outs[0].shape[-2:]
            ups = [F.interpolate(sk, size=size, mode="bilinear", align_corners=False) for sk in skips]
            fg = self.fg_head(torch.cat([outs[0], *ups], 1))
        return skips, outs[0], fg

    def step(self, skips: list[torch.Tensor], fine: torch.Tensor, canvas: torch.Tensor | None, states: list | None,
             fg: torch.Tensor | None = None, guide=None):
        """One decoder step -> (mask logits [B, Hp, Wp], class logits [B, C] or None, stop logits
        [B], new states, pointer logits [B, h, w] at the coarsest level or None without
        ``pointer``). ``canvas`` [B, 1, Hp, Wp] in [0, 1] (None without ``feed_canvas``); ``fg``
        the foreground logits of ``encode`` (None without ``foreground``). With ``guided``, the
        finer levels get a one-hot map of the cell ``guide(pointer logits)`` returns (int64 [B]
        flat cells; default the argmax). The mask is refined at stride 2 (``fine``) and upsampled
        bilinearly."""
        states = states or [None] * self.levels
        new_states, pooled = [], []
        maps = []  # [B, 1, Hp/2, Wp/2] side inputs: the canvas, the uncovered foreground
        if canvas is not None:
            maps.append(F.adaptive_avg_pool2d(canvas, fine.shape[-2:]))
        left = None
        if fg is not None:
            left = torch.sigmoid(fg.detach())
            if canvas is not None:
                left = left * (1.0 - maps[0])
            maps.append(left)
        side = torch.cat(maps, 1) if maps else None
        y, ptr_logits, ptr_map = None, None, None
        for i, (cell, skip) in enumerate(zip(self.cells, skips)):
            parts = [skip]
            if y is not None:
                parts.append(F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            if side is not None:
                parts.append(F.adaptive_avg_pool2d(side, skip.shape[-2:]))
            if ptr_map is not None:
                parts.append(F.interpolate(ptr_map, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            h, c = cell(torch.cat(parts, 1), states[i])
            new_states.append((h, c))
            pooled.append(h.amax(dim=(2, 3)))
            y = h
            if i == 0 and self.pointer_head is not None:
                ptr_logits, ptr_map = self._point(h)
                if self.params.guided:
                    cells = guide(ptr_logits) if guide is not None else ptr_logits.detach().flatten(1).argmax(1)
                    ptr_map = F.one_hot(cells, ptr_logits[0].numel()).to(h.dtype).reshape(h.shape[0], 1, *h.shape[-2:])
        parts = [F.interpolate(self.to_fine(y), size=fine.shape[-2:], mode="bilinear", align_corners=False), fine]
        if side is not None:
            parts.append(side)
        if ptr_map is not None:
            parts.append(F.interpolate(ptr_map, size=fine.shape[-2:], mode="bilinear", align_corners=False))
        logits = self.refine(torch.cat(parts, 1))
        size = (fine.shape[-2] * 2, fine.shape[-1] * 2)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0]
        feat = torch.cat(pooled, 1)
        cls = self.class_head(feat) if self.class_head is not None else None
        if left is not None:
            feat = torch.cat([feat, left.amax(dim=(1, 2, 3))[:, None], left.mean(dim=(1, 2, 3))[:, None]], 1)
        return logits, cls, self.stop_head(feat)[:, 0], new_states, ptr_logits

    def _point(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarsest hidden state [B, C, h, w] -> (pointer logits [B, h, w], the spatial softmax
        scaled to peak 1, [B, 1, h, w])."""
        b, _, hh, ww = h.shape
        ys = torch.linspace(-1.0, 1.0, hh, device=h.device)[:, None].expand(hh, ww)
        xs = torch.linspace(-1.0, 1.0, ww, device=h.device)[None, :].expand(hh, ww)
        coords = torch.stack([ys, xs])[None].expand(b, -1, -1, -1)
        logits = self.pointer_head(torch.cat([h, coords], 1))[:, 0]
        attn = torch.softmax(logits.flatten(1), 1).reshape(b, 1, hh, ww)
        return logits, attn / attn.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None):
        x = pad_batch(images, self.multiple)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            return self._losses(x, targets)
        return self._infer(x, [(int(im.shape[1]), int(im.shape[2])) for im in images])

    def _losses(self, x: torch.Tensor, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        p = self.params
        if p.guided:
            return self._guided_losses(x, targets)
        skips, fine, fg = self.encode(x)
        hp, wp = x.shape[-2:]
        n_max = max(int(t["masks"].shape[0]) for t in targets)
        steps = min(n_max + 1, p.max_steps)
        canvas = x.new_zeros((x.shape[0], 1, hp, wp)) if p.feed_canvas else None
        states, logits, classes, stops, ptrs = None, [], [], [], []
        for _ in range(steps):
            m, c, s, states, ptr = self.step(skips, fine, canvas, states, fg)
            logits.append(m)
            classes.append(c)
            stops.append(s)
            ptrs.append(ptr)
            if canvas is not None:
                canvas = torch.maximum(canvas, torch.sigmoid(m.detach())[:, None])
        logits_t, stops_t = torch.stack(logits, 1), torch.stack(stops, 1)  # [B, T, Hp, Wp], [B, T]
        classes_t = torch.stack(classes, 1) if classes[0] is not None else None
        ptrs_t = torch.stack(ptrs, 1) if ptrs[0] is not None else None  # [B, T, h, w]
        parts, unions = [], []
        for b, t in enumerate(targets):
            masks = pad_masks(t["masks"].to(x.device), hp, wp)
            unions.append(masks.any(0) if masks.shape[0] else torch.zeros((hp, wp), dtype=torch.bool, device=x.device))
            parts.append(rsis_loss(logits_t[b], None if classes_t is None else classes_t[b], stops_t[b], masks, t["labels"],
                                   None if ptrs_t is None else ptrs_t[b], p.order_prior))
        mean = {k: torch.stack([q[k] for q in parts]).mean() for k in parts[0]}
        losses = {"loss_mask": p.w_mask * mean["mask"], "loss_bce": p.w_bce * mean["bce"], "loss_stop": p.w_stop * mean["stop"]}
        if ptrs_t is not None:
            losses["loss_pointer"] = p.w_pointer * mean["pointer"]
        if fg is not None:
            fg_full = F.interpolate(fg, size=(hp, wp), mode="bilinear", align_corners=False)[:, 0]
            losses["loss_fg"] = p.w_fg * F.binary_cross_entropy_with_logits(fg_full, torch.stack(unions).float())
        if self.class_head is not None:
            losses["loss_step_class"] = p.w_step_class * mean["class"]
        if self.classifier is not None:
            losses["loss_class"] = p.w_class * self.classifier.batch_loss(x, targets)
        return losses

    def _guided_losses(self, x: torch.Tensor, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``guided`` training: no matching. Each step, per image, the remaining object with the
        highest pointer probability at its interior cell is fed and supervises the mask (soft IoU
        + BCE) and class; the pointer gets ``set_pointer_loss`` over the remaining objects; the
        stop target is 1 once none remain; the canvas receives the chosen ground-truth masks."""
        p = self.params
        skips, fine, fg = self.encode(x)
        b_n, hp, wp = x.shape[0], x.shape[2], x.shape[3]
        gts = [pad_masks(t["masks"].to(x.device), hp, wp) for t in targets]
        grid = tuple(skips[0].shape[-2:])
        cells = [interior_cells(g, grid).to(x.device) for g in gts]
        left = [list(range(g.shape[0])) for g in gts]
        steps = min(max(g.shape[0] for g in gts) + 1, p.max_steps)
        canvas = x.new_zeros((b_n, 1, hp, wp))
        states = None
        terms: dict[str, list] = {"mask": [], "bce": [], "class": [], "stop": [], "pointer": []}
        for _ in range(steps):
            chosen = [-1] * b_n

            def guide(logits: torch.Tensor) -> torch.Tensor:
                out = logits.detach().flatten(1).argmax(1)
                probs = logits.detach().flatten(1)
                for b in range(b_n):
                    if left[b]:
                        idx = torch.as_tensor(left[b], device=x.device)
                        chosen[b] = left[b][int(probs[b, cells[b][idx]].argmax())]
                        out[b] = cells[b][chosen[b]]
                return out

            m, c, s, states, ptr = self.step(skips, fine, canvas, states, fg, guide=guide)
            for b in range(b_n):
                j = chosen[b]
                terms["stop"].append(F.binary_cross_entropy_with_logits(s[b], s.new_tensor(float(j < 0))))
                if j < 0:
                    continue
                g = gts[b][j].flatten().float()
                prob = torch.sigmoid(m[b]).flatten()
                inter = (prob * g).sum()
                terms["mask"].append(1.0 - inter / (prob.sum() + g.sum() - inter).clamp(min=1e-6))
                terms["bce"].append(F.binary_cross_entropy_with_logits(m[b].flatten(), g))
                terms["pointer"].append(set_pointer_loss(ptr[b], cells[b][torch.as_tensor(left[b], device=x.device)]))
                if c is not None:
                    terms["class"].append(F.cross_entropy(c[b][None], targets[b]["labels"].to(x.device)[j][None] - 1))
                left[b].remove(j)
                canvas[b, 0] = torch.maximum(canvas[b, 0], gts[b][j].float())
        zero = x.sum() * 0.0
        mean = {k: torch.stack(v).mean() if v else zero for k, v in terms.items()}
        losses = {"loss_mask": p.w_mask * mean["mask"], "loss_bce": p.w_bce * mean["bce"], "loss_stop": p.w_stop * mean["stop"],
                  "loss_pointer": p.w_pointer * mean["pointer"]}
        if fg is not None:
            union = torch.stack([g.any(0) if g.shape[0] else torch.zeros((hp, wp), dtype=torch.bool, device=x.device)
                                 for g in gts]).float()
            fg_full = F.interpolate(fg, size=(hp, wp), mode="bilinear", align_corners=False)[:, 0]
            losses["loss_fg"] = p.w_fg * F.binary_cross_entropy_with_logits(fg_full, union)
        if self.class_head is not None:
            losses["loss_step_class"] = p.w_step_class * mean["class"]
        if self.classifier is not None:
            losses["loss_class"] = p.w_class * self.classifier.batch_loss(x, targets)
        return losses

    @torch.no_grad()
    def _infer(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[list[Cluster]]:
        p = self.params
        skips, fine, fg = self.encode(x)
        b_n, hp, wp = x.shape[0], x.shape[2], x.shape[3]
        canvas = x.new_zeros((b_n, 1, hp, wp)) if p.feed_canvas else None
        taken = torch.zeros((b_n, hp, wp), dtype=torch.bool, device=x.device)
        active = [True] * b_n
        out: list[list[Cluster]] = [[] for _ in range(b_n)]
        states = None
        for _ in range(p.max_steps):
            m, c, s, states, _ = self.step(skips, fine, canvas, states, fg)
            prob = torch.sigmoid(m)
            stop = torch.sigmoid(s)
            cls = torch.softmax(c, 1) if c is not None else None
            for b, (h, w) in enumerate(sizes):
                if not active[b]:
                    continue
                if steps_before_stop([float(stop[b])], p.stop_thresh) == 0:
                    active[b] = False
                    continue
                cluster = self._instance(prob[b, :h, :w], taken[b, :h, :w], float(stop[b]), None if cls is None else cls[b])
                taken[b, :h, :w] |= prob[b, :h, :w] > p.mask_thresh
                if cluster is not None:
                    out[b].append(cluster)
            if not any(active):
                break
            if canvas is not None:
                canvas = torch.maximum(canvas, prob[:, None])
        if self.classifier is not None:
            out = [self.classifier.classify(x[b], clusters) for b, clusters in enumerate(out)]
        return out

    def _instance(self, prob: torch.Tensor, taken: torch.Tensor, stop: float, cls: torch.Tensor | None) -> Cluster | None:
        """One step's instance from its mask probabilities [h, w] and the pixels already taken."""
        p = self.params
        full = prob > p.mask_thresh
        new = full & ~taken
        n_new, n_full = int(new.sum()), int(full.sum())
        if n_new < p.min_pixels or n_new * 2 <= n_full:
            return None
        ys, xs = (v.cpu().numpy() for v in torch.nonzero(new, as_tuple=True))
        x0, y0, x1, y1 = window(ys, xs, *prob.shape)
        score = (1.0 - stop) * float(prob[new].mean())
        label = 1
        if cls is not None:
            label = int(cls.argmax()) + 1
            score *= float(cls.max())
        local = (prob[y0:y1, x0:x1] * ~taken[y0:y1, x0:x1]).float().cpu().numpy()
        return Cluster(ys=ys.astype(np.int64), xs=xs.astype(np.int64), score=score, label=label, window=(x0, y0, x1, y1), prob=local)


def build_network(*, params: RSISParams, num_classes: int) -> RSISNet:
    """An untrained RSIS network; ``num_classes`` excludes the background."""
    return RSISNet(params, num_classes)


class RSISAdapter(ClusterAdapter):
    """Instances from RSIS, one per decoder step (at most ``max_steps`` per image). ``mask_probs``
    samples the step's mask probabilities (zero where earlier steps took the pixel) into the box
    frame; the score threshold drops instances after decoding."""

    params_cls = RSISParams
    build_network = staticmethod(build_network)


@register("rsis")
def build(card: ModelCard) -> RSISAdapter:
    return RSISAdapter.from_card(card)
