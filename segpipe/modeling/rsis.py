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

Variants (``RSISParams``; the zoo's rsis cards use ``point``): the paper's matched decoder
above; ``pointer`` / ``guided`` (a coarse spatial softmax picks the object); and ``point``
(segpipe.modeling.rsis_point): each step takes the peak of a centre heat map read from its
hidden state and the canvas, and a point-conditioned mask head segments the object there.
Training feeds the remaining object the heat map rates highest, so matching is the step's own
choice instead of the Hungarian search (which the paper variant keeps).

Differences from the paper, for CPU budgets: a small BN encoder instead of ResNet-101; the
canvas input (from Ren and Zemel's recurrent attention, CVPR 2017), which tells each step what
has been covered without relying on the LSTM memory alone; and (``foreground``) a foreground head
on the encoder, trained by BCE to the union of the instances, whose not-yet-covered part
(foreground x (1 - canvas), detached) is a further input of every step and, as its max and mean,
of the stop head: "what is left" is then read, not remembered, and the step count generalises
from training crops to larger images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from segpipe.config import ModelCard, RSISParams
from segpipe.modeling.batching import pad_batch
from segpipe.modeling.embed_cluster import Cluster, window
from segpipe.modeling.embednet import ClusterAdapter, EmbBatch, conv_bn_relu, encoder, pad_masks
from segpipe.modeling.instance_classifier import make_classifier, match_clusters
from segpipe.modeling.registry import register
from segpipe.structures import Instances
from segpipe.modeling import rsis_point as pt


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
    instance's most interior pixel (``rsis_point.interior_points``; a ring's lies on the ring, not
    in its hole). Empty instances get cell 0."""
    n, hh, ww = masks.shape
    gh, gw = grid
    points, _, _ = pt.interior_points(masks.cpu().numpy())
    ys, xs = points[:, 0].astype(np.int64), points[:, 1].astype(np.int64)
    return torch.from_numpy(np.minimum(ys * gh // hh, gh - 1) * gw + np.minimum(xs * gw // ww, gw - 1)).reshape(n)


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
        self.point_heads, self.up, self.pyramid_head = None, None, None
        if params.point:
            # A U-Net decoder (as in embednet) back to stride 2; the heat map reads its level at
            # point_stride, the mask head its stride-2 output.
            self.up = nn.ModuleList(nn.Sequential(conv_bn_relu(c_in + c_skip, c_skip), conv_bn_relu(c_skip, c_skip))
                                    for c_skip, c_in in zip(reversed(ch[:-1]), reversed(ch[1:])))
            heat_ch = ch[params.point_stride.bit_length() - 2]
            flat = params.point_head == "flat"
            self.point_heads = pt.PointHeads(heat_ch, ch[0], params.lstm_channels[-1], canvas, params.point_width,
                                             params.point_scale, flat_mask=flat)
            if not flat:  # from the finest LSTM level's stride down to 2
                s0 = 2 ** (len(ch) - self.levels + 1)
                strides = [s0 >> k for k in range(s0.bit_length() - 1)]
                self.pyramid_head = pt.PyramidMaskHead({s: ch[s.bit_length() - 2] for s in strides}, params.lstm_channels[-1],
                                                       canvas, params.point_width, params.point_scale)
        self.stop_head = nn.Linear(pooled + (2 if params.foreground else 0) + (1 if params.point else 0), 1)
        self.multiple = max(16, 2 ** len(ch))
        if params.train_only == "classifier":
            if self.classifier is None:
                raise ValueError("train_only: classifier needs the instance classifier (classify: instances and two or "
                                 f"more classes; this network has {num_classes})")
            for name, q in self.named_parameters():
                q.requires_grad_(name.startswith("classifier."))

    def train(self, mode: bool = True) -> "RSISNet":
        """As ``nn.Module.train``; with ``train_only: classifier`` every part but the classifier
        stays in eval mode (its batch norms keep their statistics, and it decodes as at inference)."""
        super().train(mode)
        if mode and self.params.train_only == "classifier":
            for child in self.children():
                child.train(child is self.classifier)
        return self

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Normalised padded images [B, 3, Hp, Wp] -> (projected encoder outputs for the LSTM
        levels, coarse to fine; the stride-2 features [B, channels[0], Hp/2, Wp/2]; foreground
        logits [B, 1, Hp/2, Wp/2] or None without ``foreground``)."""
        skips, outs, fg = self._encode(x)
        return skips, outs[0], fg

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """As ``encode``, but with every encoder level's output (strides 2, 4, ...; the last after
        the context block) instead of the first alone."""
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
        return skips, outs, fg

    def encode_point(self, x: torch.Tensor):
        """The point variant's encoding: (the LSTM levels' projected skips, coarse to fine; the
        U-Net decoder's stride-2 features [B, channels[0], Hp/2, Wp/2]; its features at
        ``point_stride`` [B, C, Hp/s, Wp/s]; foreground logits at stride 2 or None; the decoder's
        features per stride {s: [B, C_s, Hp/s, Wp/s]})."""
        skips, outs, fg = self._encode(x)
        y, dec = outs[-1], {}
        for block, skip in zip(self.up, reversed(outs[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], 1))
            dec[x.shape[-1] // y.shape[-1]] = y
        return skips, dec[2], dec[self.params.point_stride], fg, dec

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
            parts = self._level_inputs(skip, y, side)
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

    @staticmethod
    def _level_inputs(skip: torch.Tensor, above: torch.Tensor | None, side: torch.Tensor | None) -> list[torch.Tensor]:
        """An LSTM level's inputs: its encoder skip, the level above's hidden state resampled to
        it, and the side maps (canvas, uncovered foreground) pooled to it."""
        parts = [skip]
        if above is not None:
            parts.append(F.interpolate(above, size=skip.shape[-2:], mode="bilinear", align_corners=False))
        if side is not None:
            parts.append(F.adaptive_avg_pool2d(side, skip.shape[-2:]))
        return parts

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
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            if self.params.train_only == "classifier":
                return self._own_class_losses(x, sizes, targets)
            return self._losses(x, targets)
        return self._infer(x, sizes)

    @torch.no_grad()
    def infer(self, images: Sequence[torch.Tensor], exhausted: list[bool] | None = None) -> list[list[Cluster]]:
        """Eval-mode forward; with ``exhausted``, appends per image whether the decoder was still
        going when ``max_steps`` ran out (the bound was reached: objects past it are missing)."""
        x = pad_batch(images, self.multiple)
        return self._infer(x, [(int(im.shape[1]), int(im.shape[2])) for im in images], exhausted)

    def _own_class_losses(self, x: torch.Tensor, sizes: list[tuple[int, int]], targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``train_only: classifier``: the frozen network decodes the batch as at inference; the
        classifier's cross-entropy on the decoded instances that match a ground-truth instance
        (``match_clusters``, IoU >= 0.5, that instance's label), cropped exactly as at inference
        (``loss_class_own``), plus its cross-entropy on the ground-truth masks (``loss_class``)."""
        p = self.params
        with torch.no_grad():
            decoded = self._decode(x, sizes)
        clf = self.classifier
        crops = [x.new_zeros((0, 4, clf.crop, clf.crop))]
        labels = [torch.zeros(0, dtype=torch.int64, device=x.device)]
        for b, (clusters, t) in enumerate(zip(decoded, targets)):
            pairs = match_clusters(clusters, t["masks"].to(x.device).bool())
            if pairs:
                crops.append(clf.cluster_crops(x[b], [clusters[i] for i, _ in pairs]))
                labels.append(t["labels"].to(x.device)[torch.as_tensor([j for _, j in pairs], device=x.device)] - 1)
        own = clf.loss(torch.cat(crops), torch.cat(labels))
        return {"loss_class_own": p.w_class * own, "loss_class": p.w_class * clf.batch_loss(x, targets)}

    def _losses(self, x: torch.Tensor, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        p = self.params
        if p.guided:
            return self._guided_losses(x, targets)
        if p.point:
            return self._point_losses(x, targets)
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
                self._matched_terms(terms, m[b], None if c is None else c[b], gts[b][j], targets[b]["labels"].to(x.device)[j])
                terms["pointer"].append(set_pointer_loss(ptr[b], cells[b][torch.as_tensor(left[b], device=x.device)]))
                left[b].remove(j)
                canvas[b, 0] = torch.maximum(canvas[b, 0], gts[b][j].float())
        zero = x.sum() * 0.0
        mean = {k: torch.stack(v).mean() if v else zero for k, v in terms.items()}
        return self._step_losses(x, targets, mean, fg, gts, {"pointer": p.w_pointer})

    def _step_losses(self, x: torch.Tensor, targets: Sequence[dict], mean: dict[str, torch.Tensor], fg: torch.Tensor | None,
                     gts: list[torch.Tensor], extra: dict[str, float]) -> dict[str, torch.Tensor]:
        """The loss dict of the step-by-step trainings (guided, point) from the mean per-step
        terms (mask, bce, class, stop and the ``extra`` names with their weights), plus the
        foreground and instance-classifier losses."""
        p = self.params
        hp, wp = x.shape[-2:]
        losses = {"loss_mask": p.w_mask * mean["mask"], "loss_bce": p.w_bce * mean["bce"], "loss_stop": p.w_stop * mean["stop"]}
        losses |= {f"loss_{k}": w * mean[k] for k, w in extra.items()}
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

    def _matched_terms(self, terms: dict[str, list], m: torch.Tensor, c: torch.Tensor | None, gt: torch.Tensor,
                       label: torch.Tensor) -> None:
        """Append one step's mask (1 - soft IoU), pixel BCE and class terms for ``gt`` bool [H, W]."""
        g = gt.flatten().float()
        prob = torch.sigmoid(m).flatten()
        inter = (prob * g).sum()
        terms["mask"].append(1.0 - inter / (prob.sum() + g.sum() - inter).clamp(min=1e-6))
        terms["bce"].append(F.binary_cross_entropy_with_logits(m.flatten(), g))
        if c is not None:
            terms["class"].append(F.cross_entropy(c[None], label.reshape(1) - 1))

    # --- the point variant (segpipe.modeling.rsis_point) ----------------------------------------

    def _lstm(self, skips: list[torch.Tensor], side: torch.Tensor | None, states: list | None):
        """The ConvLSTM hierarchy alone -> (finest hidden state, new states, max-pooled hidden
        states of every level [B, sum(lstm_channels)])."""
        states = states or [None] * self.levels
        new_states, pooled, y = [], [], None
        for i, (cell, skip) in enumerate(zip(self.cells, skips)):
            h, c = cell(torch.cat(self._level_inputs(skip, y, side), 1), states[i])
            new_states.append((h, c))
            pooled.append(h.amax(dim=(2, 3)))
            y = h
        return y, new_states, torch.cat(pooled, 1)

    def point_step(self, enc, canvas: torch.Tensor, states: list | None, choose):
        """One step of the point variant. ``enc`` = ``encode_point``'s output; ``canvas`` [B, 1,
        Hp, Wp] in [0, 1]; ``choose(heat logits [B, h, w]) -> points float [B, 2]`` (y, x) pixels.
        -> (mask logits [B, Hp, Wp], class logits [B, C] or None, stop logits [B], new states, heat
        logits [B, h, w] at ``point_stride``). The stop head reads the pooled hidden states, the
        uncovered foreground's max and mean, and the heat map's max outside the canvas."""
        skips, dec2, dech, fg, decs = enc
        c2 = F.adaptive_avg_pool2d(canvas, dec2.shape[-2:])
        maps, left = [c2], None
        if fg is not None:
            left = torch.sigmoid(fg.detach()) * (1.0 - c2)
            maps.append(left)
        side2 = torch.cat(maps, 1)
        y, states, pooled = self._lstm(skips, side2, states)
        grid = dech.shape[-2:]
        side_h = F.adaptive_avg_pool2d(side2, grid)
        heat = self.point_heads.heat(dech, F.interpolate(y, size=grid, mode="bilinear", align_corners=False), side_h)
        points = choose(heat)
        if self.pyramid_head is not None:
            m = self.pyramid_head(decs, y, side2, points)
        else:
            m = self.point_heads.mask(dec2, F.interpolate(y, size=dec2.shape[-2:], mode="bilinear", align_corners=False),
                                      side2, points, 2)
        logits = F.interpolate(m[:, None], size=(dec2.shape[-2] * 2, dec2.shape[-1] * 2), mode="bilinear",
                               align_corners=False)[:, 0]
        cls = self.class_head(pooled) if self.class_head is not None else None
        extra = [] if left is None else [left.amax(dim=(1, 2, 3)), left.mean(dim=(1, 2, 3))]
        extra.append((torch.sigmoid(heat.detach()) * (1.0 - side_h[:, 0])).flatten(1).amax(1))
        feat = torch.cat([pooled, torch.stack(extra, 1)], 1)
        return logits, cls, self.stop_head(feat)[:, 0], states, heat

    def _point_losses(self, x: torch.Tensor, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Point-variant training: each step, per image, the remaining object whose centre the
        heat map rates highest is fed (a core pixel with ``point_jitter``) and supervises the mask
        (soft IoU + BCE) and class; the heat map learns the remaining objects' Gaussian peaks
        (focal loss); the stop target is 1 once none remain; the canvas receives the chosen
        ground-truth masks. Batched over images: objects are padded to the batch's largest count."""
        p = self.params
        enc = self.encode_point(x)
        b_n, hp, wp = x.shape[0], x.shape[2], x.shape[3]
        s, grid = p.point_stride, tuple(enc[2].shape[-2:])
        n_max = max(int(t["masks"].shape[0]) for t in targets)
        gts = torch.zeros((b_n, max(n_max, 1), hp, wp), dtype=torch.bool, device=x.device)
        heats = x.new_zeros((b_n, max(n_max, 1), *grid))
        cells = torch.zeros((b_n, max(n_max, 1)), dtype=torch.int64, device=x.device)
        fed = x.new_zeros((b_n, max(n_max, 1), 2))
        labels = torch.ones((b_n, max(n_max, 1)), dtype=torch.int64, device=x.device)
        left = torch.zeros((b_n, max(n_max, 1)), dtype=torch.bool, device=x.device)
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,))))
        for b, t in enumerate(targets):
            n = int(t["masks"].shape[0])
            if n == 0:
                continue
            g = pad_masks(t["masks"].to(x.device), hp, wp)
            points, radii, cores = pt.interior_points(g.cpu().numpy())
            pts_t = torch.from_numpy(points).to(x.device)
            gts[b, :n] = g
            heats[b, :n] = pt.heat_targets(pts_t, torch.from_numpy(radii).to(x.device), grid, s)
            cells[b, :n] = pt.cell_of(pts_t, s, grid)
            fed[b, :n] = torch.from_numpy(pt.sample_points(points, cores, wp, rng, p.point_jitter)).to(x.device)
            labels[b, :n] = t["labels"].to(x.device)
            left[b, :n] = True
        rows = torch.arange(b_n, device=x.device)
        canvas = x.new_zeros((b_n, 1, hp, wp))
        states = None
        sums = {k: x.new_zeros(()) for k in ("mask", "bce", "class", "stop", "heat")}
        counts = {"matched": x.new_zeros(()), "steps": 0}
        for _ in range(min(n_max + 1, p.max_steps, p.train_steps or p.max_steps)):
            pick: dict[str, torch.Tensor] = {}

            def choose(heat: torch.Tensor) -> torch.Tensor:
                vals = heat.detach().flatten(1).gather(1, cells).masked_fill(~left, float("-inf"))
                pick["j"] = vals.argmax(1)
                pick["has"] = left.any(1)
                return fed[rows, pick["j"]]

            m, c, st, states, heat = self.point_step(enc, canvas, states, choose)
            j, has = pick["j"], pick["has"]
            target = (heats * left[:, :, None, None]).amax(1)
            sums["heat"] = sums["heat"] + pt.focal_heat_loss(heat, target).sum()
            sums["stop"] = sums["stop"] + F.binary_cross_entropy_with_logits(st, (~has).float(), reduction="sum")
            counts["steps"] += b_n
            w = has.float()
            g = gts[rows, j].flatten(1).float()  # [B, P]
            prob = torch.sigmoid(m).flatten(1)
            inter = (prob * g).sum(1)
            iou = inter / (prob.sum(1) + g.sum(1) - inter).clamp(min=1e-6)
            sums["mask"] = sums["mask"] + ((1.0 - iou) * w).sum()
            sums["bce"] = sums["bce"] + (F.binary_cross_entropy_with_logits(m.flatten(1), g, reduction="none").mean(1) * w).sum()
            if c is not None:
                sums["class"] = sums["class"] + (F.cross_entropy(c, labels[rows, j] - 1, reduction="none") * w).sum()
            counts["matched"] = counts["matched"] + w.sum()
            canvas = torch.maximum(canvas, (gts[rows, j] & has[:, None, None]).float()[:, None])
            left[rows, j] &= ~has
        matched = counts["matched"].clamp(min=1.0)
        mean = {k: sums[k] / matched for k in ("mask", "bce", "class")} | {k: sums[k] / counts["steps"] for k in ("stop", "heat")}
        return self._step_losses(x, targets, mean, enc[3], [gts[b, : int(t["masks"].shape[0])] for b, t in enumerate(targets)],
                                 {"heat": p.w_heat})

    @torch.no_grad()
    def _point_infer(self, x: torch.Tensor, sizes: list[tuple[int, int]],
                     exhausted: list[bool] | None = None) -> list[list[Cluster]]:
        """Point-variant inference: each step takes the heat map's peak among cells that no step
        visited (a 3 x 3 cell neighbourhood per step) and that emitted masks do not cover; an
        image stops at the stop score, when no cell is left, or at ``max_steps``. Score = the
        peak's heat x the instance's mean mask probability (x class probability). The canvas gets
        the binary masks, as training's gets the binary ground truth. ``exhausted``: as ``infer``'s."""
        p = self.params
        enc = self.encode_point(x)
        b_n, hp, wp = x.shape[0], x.shape[2], x.shape[3]
        s, (gh, gw) = p.point_stride, enc[2].shape[-2:]
        canvas = x.new_zeros((b_n, 1, hp, wp))
        taken = torch.zeros((b_n, hp, wp), dtype=torch.bool, device=x.device)
        visited = torch.ones((b_n, gh, gw), dtype=torch.bool, device=x.device)
        for b, (h, w) in enumerate(sizes):
            visited[b, : -(-h // s), : -(-w // s)] = False  # padding is never pointed at
        active = [True] * b_n
        out: list[list[Cluster]] = [[] for _ in range(b_n)]
        picked: dict[str, torch.Tensor] = {}

        def choose(heat: torch.Tensor) -> torch.Tensor:
            covered = F.adaptive_avg_pool2d(taken[:, None].float(), (gh, gw))[:, 0] > 0.5
            masked = heat.masked_fill(visited | covered, float("-inf")).flatten(1)
            cells = masked.argmax(1)
            picked["cells"] = cells
            picked["ok"] = torch.isfinite(masked.gather(1, cells[:, None]))[:, 0]
            picked["peak"] = torch.sigmoid(heat.flatten(1).gather(1, cells[:, None]))[:, 0]
            return pt.cell_centre(cells, s, gw)

        states = None
        for _ in range(p.max_steps):
            m, c, st, states, _ = self.point_step(enc, canvas, states, choose)
            prob, stop = torch.sigmoid(m), torch.sigmoid(st)
            binary = prob > p.mask_thresh
            cls = torch.softmax(c, 1) if c is not None else None
            for b, (h, w) in enumerate(sizes):
                if not active[b]:
                    continue
                if not bool(picked["ok"][b]) or float(stop[b]) >= p.stop_thresh:
                    active[b] = False
                    continue
                cluster = self._instance(prob[b, :h, :w], taken[b, :h, :w], float(picked["peak"][b]),
                                         None if cls is None else cls[b])
                taken[b, :h, :w] |= binary[b, :h, :w]
                if cluster is not None:
                    out[b].append(cluster)
            if not any(active):
                break
            hit = torch.zeros((b_n, gh * gw), device=x.device)
            hit[torch.arange(b_n, device=x.device), picked["cells"]] = 1.0
            visited |= F.max_pool2d(hit.reshape(b_n, 1, gh, gw), 3, 1, 1)[:, 0] > 0
            canvas = torch.maximum(canvas, binary[:, None].float())
        if exhausted is not None:
            exhausted.extend(active)  # still going after the last step: stopped by the bound
        return out

    @torch.no_grad()
    def _infer(self, x: torch.Tensor, sizes: list[tuple[int, int]], exhausted: list[bool] | None = None) -> list[list[Cluster]]:
        """Inference: ``_decode``, then (with the instance classifier) each instance named by it."""
        out = self._decode(x, sizes, exhausted)
        if self.classifier is not None:
            out = [self.classifier.classify(x[b], clusters) for b, clusters in enumerate(out)]
        return out

    @torch.no_grad()
    def _decode(self, x: torch.Tensor, sizes: list[tuple[int, int]], exhausted: list[bool] | None = None) -> list[list[Cluster]]:
        """The decoder's instances per image (label from the step class head, or 1), before the
        instance classifier names them. ``exhausted``: as ``infer``'s."""
        p = self.params
        if p.point:
            return self._point_infer(x, sizes, exhausted)
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
                cluster = self._instance(prob[b, :h, :w], taken[b, :h, :w], 1.0 - float(stop[b]),
                                         None if cls is None else cls[b])
                taken[b, :h, :w] |= prob[b, :h, :w] > p.mask_thresh
                if cluster is not None:
                    out[b].append(cluster)
            if not any(active):
                break
            if canvas is not None:
                canvas = torch.maximum(canvas, prob[:, None])
        if exhausted is not None:
            exhausted.extend(active)  # still going after the last step: stopped by the bound
        return out

    def _instance(self, prob: torch.Tensor, taken: torch.Tensor, confidence: float, cls: torch.Tensor | None) -> Cluster | None:
        """One step's instance from its mask probabilities [h, w] and the pixels already taken;
        score = ``confidence`` x the mean mask probability over the instance (x class probability)."""
        p = self.params
        full = prob > p.mask_thresh
        new = full & ~taken
        n_new, n_full = int(new.sum()), int(full.sum())
        if n_new < p.min_pixels or n_new * 2 <= n_full:
            return None
        ys, xs = (v.cpu().numpy() for v in torch.nonzero(new, as_tuple=True))
        x0, y0, x1, y1 = window(ys, xs, *prob.shape)
        score = confidence * float(prob[new].mean())
        label = 1
        if cls is not None:
            label = int(cls.argmax()) + 1
            score *= float(cls.max())
        local = (prob[y0:y1, x0:x1] * ~taken[y0:y1, x0:x1]).float().cpu().numpy()
        return Cluster(ys=ys.astype(np.int64), xs=xs.astype(np.int64), score=score, label=label, window=(x0, y0, x1, y1), prob=local)


def build_network(*, params: RSISParams, num_classes: int) -> RSISNet:
    """An untrained RSIS network; ``num_classes`` excludes the background."""
    return RSISNet(params, num_classes)


@dataclass
class RSISDecoded:
    """``RSISAdapter.forward``'s output: per image, its clusters and whether ``max_steps`` ran out."""

    clusters: list[list[Cluster]]
    exhausted: list[bool]

    def __len__(self) -> int:
        return len(self.clusters)


class RSISAdapter(ClusterAdapter):
    """Instances from RSIS, one per decoder step (at most ``max_steps`` per image: the instance
    bound). ``mask_probs`` samples the step's mask probabilities (zero where earlier steps took
    the pixel) into the box frame; the score threshold drops instances after decoding. An image
    reached the bound when its decoder had not stopped after ``max_steps`` steps (repeats and
    specks are dropped, so it may hold fewer than ``max_steps`` instances)."""

    params_cls = RSISParams
    build_network = staticmethod(build_network)
    bound_param = "max_steps"

    def forward(self, batch: EmbBatch) -> RSISDecoded:
        exhausted: list[bool] = []
        clusters = self.network.infer([t.to(self.device) for t in batch.tensors], exhausted)
        return RSISDecoded(clusters, exhausted)

    def reached_bound(self, raw: RSISDecoded) -> list[bool]:
        return list(raw.exhausted)

    def postprocess(self, raw: RSISDecoded, batch: EmbBatch) -> list[Instances]:
        return super().postprocess(raw.clusters, batch)


@register("rsis")
def build(card: ModelCard) -> RSISAdapter:
    return RSISAdapter.from_card(card)
