"""Mask-level fusion of several models' instances on one image (``fuse_image``; ``fuse_images``
batches the soft fusion of several images): pure functions, no Ray.

Matching: every instance of every model, in order of decreasing weight x score, joins the
group whose first (strongest) member it overlaps most, by mask IoU on the RLEs, if that IoU
reaches ``iou_thresh``, the group has the same class (unless ``class_agnostic``) and holds no
instance of the same model yet; otherwise it starts a group. Greedy and deterministic.

Fusion of a group inside the union of its members' boxes (``EnsembleConfig.method``):
``soft`` averages the members' box-frame soft masks weighted by weight x score and keeps
pixels at or above ``mask_thresh``; ``vote`` keeps a pixel when the weights of the members
covering it reach ``quorum`` x the weight of all the ensemble's models (absent models vote no);
``best`` keeps the strongest member's mask.

A group of one passes through as it is (its mask, box and box-frame soft mask; spread 0).

Each fused instance: score = sum(weight x score over members) / total weight of all models (a
model that found nothing counts as 0); members (model, version, score, IoU to the fused mask);
n_votes = members; agreement = mean pairwise mask IoU of the members (None for one);
confidence = score x agreement (x 1 for one member); with ``rank: confidence`` the instance's
score is its confidence; the box-frame soft mask is the fused
probability map sampled into the fused box, and ``spread`` the members' disagreement (the std
of their probability maps) in the same frame, for the refiner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np
import torch

from segpipe.config import EnsembleConfig
from segpipe.ops import masks as mask_ops
from segpipe.structures import SOFT_MASK_SIZE, Instances


@dataclass(frozen=True)
class ModelOutput:
    """One model's instances on the image: ``name`` (card name, the key of
    ``EnsembleConfig.weights``) and ``version`` (name@digest, for provenance)."""

    name: str
    version: str
    instances: Instances


@dataclass(frozen=True)
class Member:
    model: str
    model_version: str
    score: float
    iou: float  # mask IoU with the fused mask


@dataclass
class Fused:
    """The fused instances of one image (sorted by score, descending) and, per instance, its
    members, votes, agreement and confidence."""

    instances: Instances
    members: list[list[Member]] = field(default_factory=list)
    n_votes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    agreement: list[float | None] = field(default_factory=list)
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    spread: np.ndarray | None = None  # float16 [N, S, S]: std of the members' probabilities in the fused box frame


def encode_fused(fused: Fused) -> tuple[bytes, str]:
    """-> (``Instances.to_bytes()``, JSON of the per-instance members (each [model, version,
    score, iou]), votes, agreement, confidence and spread): plain columns for passing a Fused
    between pipeline stages (no pickle)."""
    meta = {"members": [[[m.model, m.model_version, m.score, m.iou] for m in ms] for ms in fused.members],
            "n_votes": fused.n_votes.tolist(),
            "agreement": fused.agreement, "confidence": fused.confidence.tolist(),
            "spread": None if fused.spread is None else fused.spread.astype(np.float16).tobytes().hex()}
    return fused.instances.to_bytes(), json.dumps(meta)


def decode_fused(data: bytes, meta: str, instances: Instances | None = None) -> Fused:
    """Inverse of ``encode_fused``. ``instances`` (the same rows in the same order, e.g. the
    refined ones) replaces decoding ``data``."""
    m = json.loads(meta)
    inst = Instances.from_bytes(data) if instances is None else instances
    spread = None
    if m.get("spread") is not None:
        spread = np.frombuffer(bytes.fromhex(m["spread"]), np.float16).reshape(len(inst), SOFT_MASK_SIZE, SOFT_MASK_SIZE)
    return Fused(instances=inst, members=[[Member(*x) for x in ms] for ms in m["members"]],
                 n_votes=np.asarray(m["n_votes"], np.int32), agreement=m["agreement"],
                 confidence=np.asarray(m["confidence"], np.float32), spread=spread)


def pairwise_iou(outputs: Sequence[ModelOutput]) -> dict[tuple[int, int], np.ndarray]:
    """Mask IoU between every two models' instances: (a, b) -> [len(a), len(b)] (pycocotools
    skips pairs whose boxes miss)."""
    out: dict[tuple[int, int], np.ndarray] = {}
    for a in range(len(outputs)):
        for b in range(a + 1, len(outputs)):
            out[(a, b)] = mask_ops.iou(outputs[a].instances.masks, outputs[b].instances.masks)
            out[(b, a)] = out[(a, b)].T
    return out


def match_groups(outputs: Sequence[ModelOutput], cfg: EnsembleConfig,
                 iou: dict[tuple[int, int], np.ndarray] | None = None) -> list[list[tuple[int, int]]]:
    """Greedy cross-model matching -> groups of (model index, instance index), each group's
    first entry its strongest member; groups in order of creation (strongest first). ``iou``:
    ``pairwise_iou(outputs)`` when the caller has it."""
    weights = [cfg.weights.get(o.name, 1.0) for o in outputs]
    order = sorted(((-weights[m] * float(o.instances.scores[i]), m, i) for m, o in enumerate(outputs)
                    for i in range(len(o.instances))))
    iou = pairwise_iou(outputs) if iou is None else iou
    groups: list[list[tuple[int, int]]] = []
    anchored: dict[tuple[int, int], int] = {}  # (model, instance) of a group's anchor -> group index
    for _, m, i in order:
        label = int(outputs[m].instances.labels[i])
        best, best_iou = None, cfg.iou_thresh
        # Only anchors overlapping this instance enough can take it: read them off the IoU rows.
        cands = sorted((anchored[(a, int(j))], a, int(j)) for a in range(len(outputs)) if a != m
                       for j in np.nonzero(iou[(m, a)][i] >= cfg.iou_thresh)[0] if (a, int(j)) in anchored)
        for g, am, ai in cands:  # in group order: ties go to the older (stronger) group, as a full scan would
            members = groups[g]
            if any(mm == m for mm, _ in members):
                continue
            if not cfg.class_agnostic and int(outputs[am].instances.labels[ai]) != label:
                continue
            v = float(iou[(m, am)][i, ai])
            if v > best_iou or (best is None and v >= best_iou):
                best, best_iou = g, v
        if best is None:
            anchored[(m, i)] = len(groups)
            groups.append([(m, i)])
        else:
            groups[best].append((m, i))
    return groups


def fuse_image(outputs: Sequence[ModelOutput], cfg: EnsembleConfig) -> Fused:
    """Fuse the models' instances on one image (all ``outputs`` share its height and width)."""
    return fuse_images([outputs], cfg)[0]


@dataclass(frozen=True)
class _Image:
    """One image's fusion context: the models' outputs, their weights and total, its size, and
    the models' pairwise mask IoUs (``pairwise_iou``)."""

    outputs: Sequence[ModelOutput]
    weights: list[float]
    total: float
    h: int
    w: int
    iou: dict


def fuse_images(images: Sequence[Sequence[ModelOutput]], cfg: EnsembleConfig) -> list[Fused]:
    """``fuse_image`` for several images -> one Fused per image, each what ``fuse_image`` gives
    it; the soft fusion of all the images' groups runs as one batched pass (the images share
    its per-call cost)."""
    ctxs, founds, soft_jobs = [], [], []
    for n, outputs in enumerate(images):
        if not outputs:
            raise ValueError("fuse_image needs at least one model's output")
        h, w = outputs[0].instances.height, outputs[0].instances.width
        if any((o.instances.height, o.instances.width) != (h, w) for o in outputs):
            raise ValueError("all models' instances must be of the same image size")
        weights = [cfg.weights.get(o.name, 1.0) for o in outputs]
        ctx = _Image(outputs=outputs, weights=weights, total=float(sum(weights)), h=h, w=w, iou=pairwise_iou(outputs))
        groups = [g for g in match_groups(outputs, cfg, ctx.iou) if len(g) >= cfg.min_votes]
        soft = [o.instances.mask_probs is not None and o.instances.mask_probs.shape[-1] == SOFT_MASK_SIZE for o in outputs]
        found: list[dict | None] = [None] * len(groups)
        for k, group in enumerate(groups):
            m, i = group[0]
            if len(group) == 1 and soft[m]:
                found[k] = _pass_through(outputs[m], weights[m], ctx.total, i, cfg)
            elif cfg.method == "soft" and all(soft[mm] for mm, _ in group):
                soft_jobs.append((n, k, group))  # soft fusion of groups whose members all carry soft masks: all at once
            else:
                found[k] = _fuse_group(outputs, weights, ctx.total, group, cfg, h, w, ctx.iou)
        ctxs.append(ctx)
        founds.append(found)
    rows = _fuse_soft([(ctxs[n], group) for n, _, group in soft_jobs], cfg)
    for (n, k, _), row in zip(soft_jobs, rows):
        founds[n][k] = row
    return [_assemble([r for r in found if r is not None], cfg, ctx.h, ctx.w) for ctx, found in zip(ctxs, founds)]


def _assemble(rows: list[dict], cfg: EnsembleConfig, h: int, w: int) -> Fused:
    """An image's fused rows -> its Fused, ranked by score (the confidence with ``rank: confidence``)."""
    if cfg.rank == "confidence":
        for r in rows:
            r["score"] = r["confidence"]
    rows.sort(key=lambda r: -r["score"])
    n = len(rows)
    inst = Instances(
        height=h,
        width=w,
        boxes=np.asarray([r["box"] for r in rows], np.float32).reshape(n, 4),
        scores=np.asarray([r["score"] for r in rows], np.float32),
        labels=np.asarray([r["label"] for r in rows], np.int64),
        masks=[r["rle"] for r in rows],
        mask_probs=np.asarray([r["probs"] for r in rows], np.float16).reshape(n, SOFT_MASK_SIZE, SOFT_MASK_SIZE),
    )
    return Fused(instances=inst, members=[r["members"] for r in rows],
                 n_votes=np.asarray([len(r["members"]) for r in rows], np.int32),
                 agreement=[r["agreement"] for r in rows],
                 confidence=np.asarray([r["confidence"] for r in rows], np.float32),
                 spread=np.asarray([r["spread"] for r in rows], np.float16).reshape(n, SOFT_MASK_SIZE, SOFT_MASK_SIZE))


def region_of(boxes: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel window (x0, y0, x1, y1) covering xyxy ``boxes`` [K, 4], clipped to the image."""
    x0, y0 = np.floor(boxes[:, :2].min(0)).astype(int)
    x1, y1 = np.ceil(boxes[:, 2:].max(0)).astype(int)
    return max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height)


def member_probs(inst: Instances, i: int, region: tuple[int, int, int, int]) -> np.ndarray:
    """Instance ``i``'s probability map over ``region`` -> float32 [rh, rw]: its box-frame soft
    mask resampled to the pixels inside its box (0 outside), or its binary mask without one."""
    if inst.mask_probs is None:
        return mask_ops.decode_region(inst.masks[i], region).astype(np.float32)
    x0, y0, x1, y1 = region
    probs = mask_ops.resample_box_frame(inst.mask_probs[i].astype(np.float32), inst.boxes[i], region)
    bx0, by0, bx1, by1 = (float(v) for v in inst.boxes[i])
    xs, ys = np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5
    inside = ((ys >= by0) & (ys < by1))[:, None] & ((xs >= bx0) & (xs < bx1))[None, :]
    return np.where(inside, probs, 0.0).astype(np.float32)


def group_probs(insts: Sequence[Instances], idx: Sequence[int], region: tuple[int, int, int, int]) -> np.ndarray:
    """The members' probability maps over ``region`` (``member_probs`` of each), with one
    grid_sample for all members that carry soft masks -> float32 [K, rh, rw]."""
    if any(ins.mask_probs is None for ins in insts):
        return np.stack([member_probs(ins, i, region) for ins, i in zip(insts, idx)])
    k, (x0, y0, x1, y1) = len(idx), region
    boxes = np.stack([ins.boxes[i] for ins, i in zip(insts, idx)]).astype(np.float32)  # [K, 4]
    maps = torch.from_numpy(np.stack([ins.mask_probs[i] for ins, i in zip(insts, idx)]).astype(np.float32))[:, None]
    probs = mask_ops.region_pixels(maps, torch.from_numpy(boxes), torch.tensor([region] * k))[:, 0].numpy()
    xs, ys = np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5  # pixel centres; 0 outside each member's box
    inside = (((ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4]))[:, :, None]
              & ((xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3]))[:, None, :])
    return np.where(inside, probs, 0.0).astype(np.float32)


def _fuse_soft(jobs: Sequence[tuple[_Image, list[tuple[int, int]]]], cfg: EnsembleConfig) -> list[dict | None]:
    """``soft`` fusion of many groups at once (``jobs``: (its image, group), images may differ),
    every member with a box-frame soft mask: what ``_fuse_group`` does to each, with the members
    of all groups resampled, averaged, thresholded, boxed, encoded and framed in a few batched
    calls (groups batched by region size, as the refiner does) -> one row (or None: empty or
    outside the image) per group, in order."""
    if not jobs:
        return []
    gm = [(g, m, i) for g, (_, group) in enumerate(jobs) for m, i in group]
    gi = np.asarray([g for g, _, _ in gm], np.int64)  # each member's group, [M]
    insts = [jobs[g][0].outputs[m].instances for g, m, _ in gm]
    boxes = np.stack([ins.boxes[i] for ins, (_, _, i) in zip(insts, gm)]).astype(np.float32)  # [M, 4]
    maps = np.stack([ins.mask_probs[i] for ins, (_, _, i) in zip(insts, gm)]).astype(np.float32)  # [M, S, S]
    strength = np.asarray([jobs[g][0].weights[m] * float(ins.scores[i]) for ins, (g, m, i) in zip(insts, gm)], np.float64)
    n_g, count = len(jobs), np.bincount(gi, minlength=len(jobs)).astype(np.float64)
    sizes = np.asarray([(ctx.w, ctx.h) for ctx, _ in jobs], np.int64)  # [G, 2]: each group's image width, height
    denom = np.bincount(gi, strength, minlength=n_g)
    share = np.where(denom[gi] > 0, strength / np.where(denom[gi] > 0, denom[gi], 1.0), 1.0 / count[gi])  # [M]
    lo = np.maximum(np.floor(np.minimum.reduceat(boxes[:, :2], np.r_[0, np.cumsum(count[:-1])].astype(np.int64))), 0)
    hi = np.ceil(np.maximum.reduceat(boxes[:, 2:], np.r_[0, np.cumsum(count[:-1])].astype(np.int64)))
    regions = np.concatenate([lo, np.minimum(hi, sizes)], 1).astype(np.int64)  # [G, 4], each group's members' union box
    ok = np.nonzero((regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1]))[0]
    out: list[dict | None] = [None] * n_g
    side = (regions[ok, 2:] - regions[ok, :2]).max(1) if len(ok) else np.zeros(0)
    bucket = np.ceil(np.log2(np.maximum(side, 32) / 32)).astype(np.int64)
    fused_rle: dict[int, dict] = {}
    for b in np.unique(bucket):
        gs = ok[bucket == b]
        local = np.full(n_g, -1, np.int64)
        local[gs] = np.arange(len(gs))
        ms = np.nonzero(local[gi] >= 0)[0]
        reg = torch.from_numpy(regions[gs])
        px = mask_ops.region_pixels(torch.from_numpy(maps[ms])[:, None], torch.from_numpy(boxes[ms]), reg[local[gi[ms]]])[:, 0]
        hh, ww = px.shape[-2:]
        mb = torch.from_numpy(boxes[ms])
        xs = reg[local[gi[ms]], 0:1].float() + torch.arange(ww, dtype=torch.float32) + 0.5  # [Mb, ww] pixel centres
        ys = reg[local[gi[ms]], 1:2].float() + torch.arange(hh, dtype=torch.float32) + 0.5
        inside = (((ys >= mb[:, 1:2]) & (ys < mb[:, 3:4]))[:, :, None] & ((xs >= mb[:, 0:1]) & (xs < mb[:, 2:3]))[:, None, :])
        px = px * inside  # 0 outside each member's box
        li = torch.from_numpy(local[gi[ms]])
        k = torch.from_numpy(count[gs]).float()[:, None, None]
        fused = torch.zeros((len(gs), hh, ww)).index_add_(0, li, px * torch.from_numpy(share[ms]).float()[:, None, None])
        mean = torch.zeros((len(gs), hh, ww)).index_add_(0, li, px) / k
        spread = (torch.zeros((len(gs), hh, ww)).index_add_(0, li, px * px) / k - mean * mean).clamp_(min=0).sqrt_()
        inr = mask_ops.in_regions(reg, hh, ww)
        fused, spread = fused * inr, spread * inr
        keep = fused >= cfg.mask_thresh
        tight, frames, nonempty = mask_ops.tight_frames(keep, torch.stack([fused, spread], 1), SOFT_MASK_SIZE)
        frames, nonempty = frames.numpy(), nonempty.numpy()
        done = np.nonzero(nonempty)[0]
        gd = gs[done]
        rles = mask_ops.encode_stack(keep.numpy()[done], regions[gd, 0], regions[gd, 1], sizes[gd, 1], sizes[gd, 0])
        tight_np = tight.numpy().astype(np.int64)
        for j, rle in zip(done, rles):
            g = int(gs[j])
            x0, y0 = int(regions[g, 0]), int(regions[g, 1])
            fused_rle[g] = rle
            out[g] = {"box": (x0 + int(tight_np[j, 0]), y0 + int(tight_np[j, 1]), x0 + int(tight_np[j, 2]), y0 + int(tight_np[j, 3])),
                      "rle": rle, "probs": frames[j, 0], "spread": frames[j, 1]}
    # Each member's IoU with its fused mask, one pycocotools call per image (RLEs of one size).
    to_fused: dict[int, float] = {}
    by_image: dict[int, list[int]] = {}
    for g in sorted(fused_rle):
        by_image.setdefault(id(jobs[g][0]), []).append(g)
    for made in by_image.values():
        col = {g: n for n, g in enumerate(made)}
        mine = np.nonzero(np.isin(gi, made))[0]
        member_iou = mask_ops.iou([insts[j].masks[gm[j][2]] for j in mine], [fused_rle[g] for g in made])  # [M', G']
        to_fused |= {int(j): float(member_iou[n, col[int(gi[j])]]) for n, j in enumerate(mine)}
    start = 0
    for g, (ctx, group) in enumerate(jobs):
        rows_of = range(start, start + len(group))
        start += len(group)
        if out[g] is None:
            continue
        out[g] |= _group_fields(ctx.outputs, group, strength[list(rows_of)], [to_fused[j] for j in rows_of], ctx.total, cfg, ctx.iou)
    return out


def _group_fields(outputs: Sequence[ModelOutput], group: list[tuple[int, int]], strength: np.ndarray, ious: Sequence[float],
                  total: float, cfg: EnsembleConfig, iou: dict) -> dict:
    """A fused group's members (each with its IoU to the fused mask, ``ious``), agreement, score
    (summed ``strength`` = weight x score over ``total``), label and confidence."""
    members = [Member(model=outputs[m].name, model_version=outputs[m].version, score=float(outputs[m].instances.scores[i]),
                      iou=float(v)) for (m, i), v in zip(group, ious)]
    agreement = float(np.mean([iou[(ma, mb)][ia, ib] for (ma, ia), (mb, ib) in combinations(group, 2)])) if len(group) > 1 else None
    score = float(strength.sum() / total)
    if cfg.class_agnostic:
        label = _majority_label([(int(outputs[m].instances.labels[i]), float(st)) for (m, i), st in zip(group, strength)])
    else:
        m0, i0 = group[0]
        label = int(outputs[m0].instances.labels[i0])
    return {"score": score, "label": label, "members": members, "agreement": agreement,
            "confidence": score * (agreement if agreement is not None else 1.0)}


def _majority_label(votes: Sequence[tuple[int, float]]) -> int:
    """The label with the most strength (weight x score) among (label, strength) votes; ties to the smallest label."""
    by: dict[int, float] = {}
    for label, s in votes:
        by[label] = by.get(label, 0.0) + s
    return max(sorted(by), key=lambda c: by[c])


def _binary_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return float(np.count_nonzero(a & b)) / union if union else 0.0


def _pass_through(out: ModelOutput, weight: float, total: float, i: int, cfg: EnsembleConfig) -> dict | None:
    """A group of one keeps its member's mask, box and box-frame soft mask as they are (every
    fusion rule leaves a lone mask unchanged, up to resampling), unless a vote quorum drops it."""
    inst = out.instances
    if cfg.method == "vote" and weight < cfg.quorum * total - 1e-9:
        return None
    if mask_ops.area([inst.masks[i]])[0] == 0:
        return None
    score = weight * float(inst.scores[i]) / total
    return {
        "box": tuple(float(v) for v in inst.boxes[i]),
        "score": score,
        "label": int(inst.labels[i]),
        "rle": inst.masks[i],
        "probs": inst.mask_probs[i].astype(np.float32),
        "spread": np.zeros((SOFT_MASK_SIZE, SOFT_MASK_SIZE), np.float32),
        "members": [Member(model=out.name, model_version=out.version, score=float(inst.scores[i]), iou=1.0)],
        "agreement": None,
        "confidence": score,
    }


def _fuse_group(outputs, weights, total, group, cfg: EnsembleConfig, h: int, w: int, iou: dict) -> dict | None:
    insts = [outputs[m].instances for m, _ in group]
    idx = [i for _, i in group]
    strength = np.asarray([weights[m] * float(outputs[m].instances.scores[i]) for m, i in group], np.float64)
    region = region_of(np.stack([ins.boxes[i] for ins, i in zip(insts, idx)]), h, w)
    x0, y0, x1, y1 = region
    if x1 <= x0 or y1 <= y0:
        return None
    # Soft fusion needs no member's binary mask: members' IoUs to the fused mask come from RLEs.
    binary = None if cfg.method == "soft" else [mask_ops.decode_region(ins.masks[i], region) for ins, i in zip(insts, idx)]
    probs = group_probs(insts, idx, region)  # [K, rh, rw]
    if cfg.method == "soft":
        denom = strength.sum()
        fused_p = np.tensordot(strength / denom, probs, 1) if denom > 0 else probs.mean(0)
        keep = fused_p >= cfg.mask_thresh
    elif cfg.method == "vote":
        mw = np.asarray([weights[m] for m, _ in group], np.float64)
        votes = sum(wk * b.astype(np.float64) for wk, b in zip(mw, binary))
        keep = votes >= cfg.quorum * total - 1e-9
        fused_p = votes / mw.sum()
    else:  # best
        k = int(np.argmax(strength))
        keep = binary[k]
        fused_p = probs[k]
    if not keep.any():
        return None
    ys, xs = np.nonzero(keep)
    box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
    local_box = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    rle = mask_ops.encode_local(keep, x0, y0, h, w)
    if binary is None:
        ious = mask_ops.iou([ins.masks[i] for ins, i in zip(insts, idx)], [rle])[:, 0]
    else:
        ious = [_binary_iou(b, keep) for b in binary]
    frames = mask_ops.crop_to_box_frame(np.stack([fused_p, np.std(probs, 0)]).astype(np.float32), local_box, SOFT_MASK_SIZE)
    return {"box": box, "rle": rle, "probs": frames[0], "spread": frames[1]} | _group_fields(
        outputs, group, strength, ious, total, cfg, iou)
