"""Every pydantic model of segpipe: workflows, model cards and method parameters.

All models forbid unknown keys and are validated once, at the boundary (CLI or card loading).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- workflows ----------------------------------------------------------------------------


_CREDENTIAL_KEYS = {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                    "access_key", "secret_key", "session_token", "password", "credentials", "profile"}


class StorageConfig(Strict):
    """How to reach an object store (s3:// URIs; ignored for local paths). Credentials never go
    here: they come from the environment or the standard AWS chain (env, shared files, instance role)."""

    endpoint_url: str | None = Field(None, description="S3 API endpoint, e.g. http://127.0.0.1:9000 (MinIO, moto, ...)")
    region: str | None = Field(None, description="bucket region, e.g. eu-west-1")
    anonymous: bool = Field(False, description="unsigned requests (public buckets)")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = sorted(k for k in data if str(k).lower() in _CREDENTIAL_KEYS)
            if bad:
                raise ValueError(f"{bad[0]}: credentials are never read from workflow files; set AWS_ACCESS_KEY_ID / "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role) in the environment")
        return data

    def options(self, uri: str) -> dict[str, Any]:
        """fsspec keyword arguments for ``uri`` (s3fs options for s3:// URIs, none otherwise)."""
        if not uri.startswith(("s3://", "s3a://")):
            return {}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        out: dict[str, Any] = {"anon": self.anonymous}
        if client:
            out["client_kwargs"] = client
        return out


class SourceConfig(Strict):
    """Where the images come from."""

    uri: str = Field(description="directory path or URI (file://, s3://) to list")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    patterns: list[str] = Field(
        default_factory=lambda: ["*.jpg", "*.jpeg", "*.png", "*.tif", "*.tiff", "*.bmp", "*.webp"],
        description="glob patterns matched against file names (case-insensitive)",
    )
    recursive: bool = True
    max_images: int | None = Field(None, ge=1, description="take only the first N (sorted) files")
    shard_size: int = Field(64, ge=1, description="images per committed shard")


class DecodeConfig(Strict):
    max_pixels: int = Field(64_000_000, ge=1, description="refuse larger images (decompression bombs)")
    max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="refuse larger files")


class EnsembleConfig(Strict):
    """Mask-level fusion of several models' instances (segpipe.ensemble.fuse)."""

    method: Literal["soft", "vote", "best"] = Field(
        "soft", description="soft: score x weight average of the members' soft masks, thresholded at mask_thresh; vote: a "
        "pixel is kept when the weights of the members covering it reach quorum x the weight of all models; best: the "
        "member with the largest weight x score")
    iou_thresh: float = Field(0.5, gt=0, le=1, description="mask IoU at which an instance joins a group")
    class_agnostic: bool = Field(False, description="match across classes (the group's class is then a weighted vote)")
    weights: dict[str, float] = Field(default_factory=dict, description="per-model weight by card name (default 1)")
    min_votes: int = Field(1, ge=1, description="drop groups with fewer members (models)")
    mask_thresh: float = Field(0.5, gt=0, lt=1, description="soft: averaged probability that keeps a pixel")
    quorum: float = Field(0.5, gt=0, le=1, description="vote: fraction of the total model weight a pixel needs")
    rank: Literal["score", "confidence"] = Field(
        "score", description="the fused instance's score: score = sum(weight x score) / total weight; confidence = that "
        "x agreement (mean pairwise mask IoU of the members; 1 for a lone member), which ranks groups whose members "
        "agree on the mask above groups that only agree on the object; with a scorer, its predicted mask IoU")
    scorer: str | None = Field(None, description="a zoo ensemble scorer (builder: scorer; `segpipe train scorer`) trained "
                               "for exactly these models: each fused instance's confidence becomes its predicted mask IoU "
                               "with the truth")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"weights must be > 0, got {bad}")
        return v


class ModelStageConfig(Strict):
    """One model stage: a zoo card and the actor pool that hosts it."""

    model: str = Field(description="zoo name (models/<name>/card.yaml) or a path to a card.yaml")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float | Literal["auto"] = Field("auto", description="'auto' = 1 when a GPU is visible, else 0")
    concurrency: int = Field(1, ge=1, description="actors in the pool")
    batch_size: int = Field(4, ge=1)
    score_threshold: float | None = Field(None, ge=0, le=1, description="override the card's threshold")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each actor needs "
                                        "(hard: actors wait until a node offers them)")
    node_labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels the actors prefer (e.g. "
                                        "{segpipe-role: model} on GPU nodes started with ray start --labels); when no "
                                        "such node is alive they run on any node, unless node_labels_strict")
    node_labels_strict: bool = Field(False, description="require node_labels instead of preferring them")

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        builtin = {"CPU", "GPU", "memory", "object_store_memory"} & set(v)
        if builtin:
            raise ValueError(f"{sorted(builtin)[0]} is set by num_cpus/num_gpus, not resources")
        bad = {k: a for k, a in v.items() if not a > 0}
        if bad:
            raise ValueError(f"amounts must be > 0, got {bad}")
        return v

    def placement(self) -> dict:
        """Ray remote args that place this stage's actors (custom resources, node labels)."""
        out: dict = {}
        if self.resources:
            out["resources"] = dict(self.resources)
        if self.node_labels:
            out["label_selector"] = dict(self.node_labels)
            if not self.node_labels_strict:  # fall back to any node: every node has a ray.io/node-id label
                out["fallback_strategy"] = [{"label_selector": {"ray.io/node-id": "!segpipe-no-node"}}]
        return out

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v):
        if isinstance(v, float) and v < 0:
            raise ValueError("num_gpus must be >= 0 or 'auto'")
        return v


class OutputConfig(Strict):
    uri: str = Field(description="output directory or URI (s3://bucket/prefix)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    primary: str | None = Field(None, description="model (card name) whose predictions fill instances/ and the COCO "
                                                  "export; default the first model. Every model's go to predictions/")
    coco: bool = True
    min_score: float = Field(0.0, ge=0, le=1, description="drop instances scoring lower from the outputs")
    min_confidence: float = Field(0.0, ge=0, le=1, description="instances/: drop rows of lower confidence (ensemble: "
                                  "score x agreement; one model: its score), e.g. to keep only sure pseudo-labels")
    min_votes: int = Field(1, ge=1, description="instances/: drop ensemble rows found by fewer models")


class PipelineConfig(Strict):
    read_num_cpus: float = Field(0.5, gt=0, description="CPUs per read+decode task")
    read_batch_size: int = Field(8, ge=1)
    ray_address: str | None = Field(None, description="None starts an embedded local Ray")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded Ray (default: all)")
    ensemble_num_cpus: float = Field(0.25, gt=0, description="CPUs per ensemble fusion task")
    max_error_rate: float = Field(1.0, ge=0, le=1, description="fail the run above this fraction of errored images "
                                  "(checked at each shard commit once error_budget_min_images are done, and at the end)")
    error_budget_min_images: int = Field(100, ge=1, description="images to see before the error rate can stop a run early")
    progress: Literal["auto", "lines", "bars", "off"] = Field(
        "auto", description="live progress: lines (per stage: done/total, rate, ETA every progress_interval_s), bars "
        "(Ray Data's operator progress bars), off; auto = bars on an interactive terminal, else lines")
    progress_interval_s: float = Field(10.0, gt=0, description="seconds between progress lines")

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        """YAML 1.1 reads a bare ``off`` as false (and ``on`` as true: the automatic choice)."""
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class RefineConfig(Strict):
    """The refinement stage: a refiner card (e.g. pointrend-nuclei) applied to what fills
    instances/ (the ensemble's instances, else the primary model's), in its own actor pool."""

    model: str = Field(description="refiner zoo name or card path")
    min_score: float = Field(0.0, ge=0, le=1, description="refine only instances scoring at least this; the others "
                             "keep their masks (as detectors refine only confident detections: about 1/5 of a "
                             "fused set scores under 0.05 and costs as much to refine as the rest)")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float | Literal["auto"] = Field("auto", description="'auto' = 1 when a GPU is visible, else 0")
    concurrency: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)


class EvalConfig(Strict):
    gt: str | None = Field(None, description="COCO ground truth json to score the run against")
    max_dets: int = Field(100, ge=1)


class TilingConfig(Strict):
    """Sliding-window inference (segpipe.ops.tiles): each model sees tiles of its training size."""

    mode: Literal["off", "auto", "on"] = Field("off", description="auto tiles images whose longer side exceeds "
                                              "auto_factor x the model's tile")
    tile: int | None = Field(None, ge=16, description="tile side, pixels (default per model: its training crop or "
                                                      "training image size)")
    overlap: float = Field(0.25, ge=0, lt=1, description="overlap of neighbouring tiles, a ratio of the tile")
    auto_factor: float = Field(1.5, ge=1, description="auto: tile when the longer side exceeds this x the tile")
    ios_thresh: float = Field(0.5, gt=0, le=1, description="merge duplicates at this intersection over smaller")
    full_image: bool = Field(False, description="also run the model on the image downscaled to one tile and merge "
                                                "in its large objects (those a tile cannot hold)")
    full_image_min_size: float = Field(0.5, gt=0, le=2, description="full_image: keep its objects whose longer box "
                                       "side exceeds this x the tile (in image pixels)")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        """YAML reads a bare on / off as a boolean."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class IncrementalConfig(Strict):
    """Incremental labeling: each run labels only what earlier committed runs of this dataset have
    not labeled with the current model versions. ``output.uri`` is then the dataset's root: runs
    go to ``<output.uri>/runs/<run_id>`` and the ledger to ``<output.uri>/_ledger``."""

    retry_errors: bool = Field(False, description="retry inputs that failed in an earlier run even when unchanged")


class OpenLineageConfig(Strict):
    """Where to send OpenLineage run events (START, COMPLETE, FAIL): an HTTP backend or a file."""

    url: str | None = Field(None, description="OpenLineage HTTP backend, e.g. http://marquez:5000")
    endpoint: str = Field("api/v1/lineage", description="path of the lineage endpoint under url")
    file: str | None = Field(None, description="append events as JSON lines to this local file")
    namespace: str = Field("segpipe", description="OpenLineage job namespace")

    @model_validator(mode="after")
    def _one_target(self) -> "OpenLineageConfig":
        if (self.url is None) == (self.file is None):
            raise ValueError("set exactly one of url or file")
        return self


class ProvenanceConfig(Strict):
    openlineage: OpenLineageConfig | None = Field(None, description="emit OpenLineage run events")


class KeepRule(Strict):
    """Which fused instances become pseudo-labels: all thresholds must hold (inclusive)."""

    min_votes: int = Field(1, ge=1, description="models that found the instance (the group's members)")
    min_agreement: float = Field(0.0, ge=0, le=1, description="mean pairwise mask IoU of the members (one member: 0)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="the ensemble's confidence (score x agreement, or the "
                                  "scorer's predicted IoU)")
    min_score: float = Field(0.0, ge=0, le=1, description="the fused score")


class PseudoLabelConfig(Strict):
    """Write the run's kept instances as a COCO training set plus a dataset card (segpipe.sinks.pseudo)."""

    keep: KeepRule = Field(default_factory=KeepRule)
    per_class: dict[str, KeepRule] = Field(default_factory=dict, description="category name -> its own rule "
                                           "(replaces keep for that class)")
    empty_images: Literal["drop", "keep"] = Field("drop", description="images none of whose instances are kept: drop "
                                                  "them (their unkept objects would teach background), or keep them")
    ignore: KeepRule | None = Field(None, description="instances not kept that pass this rule are written as ignore "
                                    "regions (iscrowd 1): a trainer that honours them learns them neither as objects "
                                    "nor as background")
    out: str = Field("pseudo", description="folder under output.uri for instances.json and card.yaml")

    @field_validator("out")
    @classmethod
    def _relative(cls, v: str) -> str:
        if not v or v.startswith("/") or "://" in v or ".." in v.split("/") or v.strip("/") in ("instances", "predictions",
                                                                                               "images", "errors", "coco",
                                                                                               "_segpipe"):
            raise ValueError(f"a new folder inside output.uri, got {v!r}")
        return v.strip("/")


class WorkflowConfig(Strict):
    """A workflow file (workflows/*.yaml)."""

    name: str = "segpipe"
    source: SourceConfig
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    models: list[ModelStageConfig] = Field(min_length=1)
    output: OutputConfig
    ensemble: EnsembleConfig | None = Field(None, description="fuse the models' instances; instances/ then holds the "
                                            "fused ones (source 'ensemble')")
    refine: RefineConfig | None = Field(None, description="refine the masks that fill instances/")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    incremental: IncrementalConfig | None = Field(None, description="label only new or changed inputs, and only with "
                                                  "the models whose version changed")
    provenance: ProvenanceConfig = Field(default_factory=ProvenanceConfig)
    pseudo_label: PseudoLabelConfig | None = Field(None, description="also write the kept fused instances as a COCO "
                                                   "training set with a dataset card (needs an ensemble)")

    @model_validator(mode="after")
    def _distinct_models(self) -> "WorkflowConfig":
        if self.pseudo_label is not None and self.ensemble is None:
            raise ValueError("pseudo_label: keeps instances by the models' agreement, so it needs an ensemble section")
        refs = [m.model for m in self.models]
        if len(set(refs)) != len(refs):
            raise ValueError(f"models: each model may appear once, got {refs}")
        if self.ensemble is not None and self.output.primary not in (None, "ensemble"):
            raise ValueError(f"output.primary: with an ensemble, instances/ holds the fused instances; got "
                             f"{self.output.primary!r} (leave it unset)")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved config."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


# --- model cards --------------------------------------------------------------------------


class Category(Strict):
    id: int = Field(ge=1)
    name: str


class WeightsSpec(Strict):
    file: str = Field(description="path relative to the card, or an absolute path / URI")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: Literal["safetensors"] = "safetensors"
    dtype: Literal["float16", "float32"] = "float16"


class TrainingRecord(Strict):
    command: str
    data: dict[str, Any] = Field(description="dataset generator/paths and parameters")
    seed: int
    iterations: int
    batch_size: int
    wall_time_s: float
    hardware: str
    log: str | None = None
    config: dict[str, Any] | None = Field(None, description="the resolved TrainConfig (recipe defaults included)")
    init: dict[str, Any] | None = Field(None, description="the card whose weights started the training: its version, "
                                        "weights sha256, how many tensors loaded and which started fresh")


class MetricsRecord(Strict):
    split: str = Field(description="what the metrics were measured on, e.g. 'shapes val seed=9999 n=200'")
    command: str
    values: dict[str, float]


class ModelCard(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    family: str
    paper: str
    builder: str
    params: dict[str, Any] = Field(default_factory=dict)
    categories: list[Category] = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict, description="input spec: colour order, value range")
    weights: WeightsSpec
    training: TrainingRecord | None = None
    metrics: list[MetricsRecord] = Field(default_factory=list)
    limits: list[str] = Field(default_factory=list, description="known limits in words, e.g. the per-image instance "
                              "bound and what happens past it (documentation: not part of the version)")
    license: str = "Apache-2.0"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelCard":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    def version(self) -> str:
        """``<name>@<sha12>``: digest of the weights digest and the architecture parameters."""
        h = hashlib.sha256()
        h.update(self.weights.sha256.encode())
        h.update(json.dumps({"builder": self.builder, "params": self.params, "categories": [c.model_dump() for c in self.categories]}, sort_keys=True).encode())
        return f"{self.name}@{h.hexdigest()[:12]}"


class MaskRCNNParams(Strict):
    """Architecture of segpipe's small Mask R-CNN (torchvision detection components)."""

    backbone_channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=4, max_length=4)
    blocks_per_stage: int = Field(1, ge=1)
    fpn_channels: int = Field(64, ge=8)
    anchor_sizes: list[int] = Field(default_factory=lambda: [8, 16, 32, 64, 128], min_length=5, max_length=5)
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: int = Field(256, ge=32, description="short side the image is resized to")
    max_size: int = Field(1024, ge=32, description="cap on the long side after resizing")
    representation_size: int = Field(256, ge=16)
    mask_head_channels: list[int] = Field(default_factory=lambda: [64, 64, 64, 64], min_length=1)
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 500
    box_batch_size_per_image: int = 256
    box_detections_per_img: int = Field(100, ge=1)
    box_score_thresh: float = Field(0.05, ge=0, le=1)
    box_nms_thresh: float = Field(0.5, gt=0, le=1)
    resize: bool = Field(True, description="resize to min_size/max_size; False keeps the native resolution")


class PolarMaskParams(Strict):
    """Architecture of segpipe's PolarMask (Xie et al., CVPR 2020): FCOS-style polar head on an FPN.

    Levels are the backbone's FPN outputs at strides 4, 8, 16, 32, 64 (indices 0..4) selected by
    ``levels``; an instance goes to the level whose (lo, hi] range holds its largest ray (pixels).
    """

    backbone_channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=4, max_length=4)
    blocks_per_stage: int = Field(1, ge=1)
    fpn_channels: int = Field(64, ge=8)
    levels: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    size_ranges: list[float] = Field(default_factory=lambda: [16.0, 32.0, 64.0, 128.0],
                                     description="ray-length boundaries between consecutive levels, pixels")
    tower_convs: int = Field(2, ge=0, description="convs in each of the class and ray towers")
    n_rays: int = Field(36, ge=4)
    center_radius: float = Field(1.5, gt=0, description="positives lie within radius*stride of the mass centre")
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    score_thresh: float = Field(0.05, ge=0, le=1, description="class probability needed to be a candidate")
    pre_nms_top_n: int = Field(2000, ge=1, description="candidates per level before NMS")
    nms_thresh: float = Field(0.5, gt=0, le=1)
    detections_per_img: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "PolarMaskParams":
        if any(lv not in range(5) for lv in self.levels) or sorted(set(self.levels)) != self.levels:
            raise ValueError("levels must be increasing indices among 0..4 (strides 4..64)")
        if len(self.size_ranges) != len(self.levels) - 1:
            raise ValueError(f"size_ranges needs len(levels) - 1 = {len(self.levels) - 1} boundaries")
        if sorted(self.size_ranges) != self.size_ranges:
            raise ValueError("size_ranges must increase")
        return self


class EmbedNetParams(Strict):
    """The shared encoder-decoder of the embedding methods (segpipe.modeling.embednet).

    Encoder levels at strides 2, 4, 8, 16 with ``channels``; a dilated context block at the
    bottom; a U-Net decoder back to stride 2; a full-resolution refinement that also sees the
    image through ``full_res_channels`` convolutions; 1x1 heads at stride 1.
    """

    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=2)
    full_res_channels: int = Field(8, ge=1)
    context_dilations: list[int] = Field(default_factory=lambda: [2, 4], description="dilated 3x3 convs at the bottom")
    classify: Literal["pixels", "instances"] = Field(
        "pixels", description="pixels: the paper's per-pixel class maps, voted over each instance; instances: class-agnostic "
        "maps plus a second-stage classifier of each instance's image crop and mask (segpipe.modeling.instance_classifier)")
    class_crop: int = Field(32, ge=8, description="instance classifier input side, pixels")
    class_channels: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1,
                                      description="instance classifier conv widths (stride 2 between levels)")
    w_class: float = Field(1.0, ge=0, description="weight of the instance classifier's cross-entropy")


class SpatialEmbParams(EmbedNetParams):
    """SpatialEmbeddings (Neven et al., CVPR 2019): offsets to the instance centre, a learned
    clustering bandwidth and per-class seediness. Coordinates are in units of ``coord_scale`` pixels."""

    coord_scale: float = Field(128.0, gt=0, description="pixels per embedding unit; offsets reach +-1 unit (tanh)")
    n_sigma: int = Field(2, ge=1, le=2, description="1: one bandwidth; 2: separate x and y bandwidths")
    w_instance: float = Field(1.0, ge=0)
    w_var: float = Field(10.0, ge=0, description="smoothness of sigma inside an instance")
    w_seed: float = Field(1.0, ge=0)
    fg_weight: float = Field(10.0, gt=0, description="seed-loss weight of instance pixels (background = 1)")
    fg_thresh: float = Field(0.5, gt=0, lt=1, description="seediness above which a pixel is foreground")
    seed_thresh: float = Field(0.5, gt=0, lt=1, description="lowest seediness that starts an instance")
    min_pixels: int = Field(8, ge=1, description="smallest instance kept, pixels")
    max_instances: int = Field(1000, ge=1, description="instances per image at most")


class DiscLossParams(EmbedNetParams):
    """Discriminative loss (De Brabandere, Neven, Van Gool, 2017): per-pixel embeddings pulled
    within ``delta_v`` of their instance mean, means pushed ``2 * delta_d`` apart, plus a
    semantic head (background + classes)."""

    embed_dim: int = Field(8, ge=1)
    coord_scale: float | None = Field(None, gt=0, description="if set, the first two embedding dimensions add the pixel's "
                                      "(x, y) / coord_scale (semi-convolutional embeddings); None = the paper's pure embedding")
    delta_v: float = Field(0.5, gt=0, description="pull margin")
    delta_d: float = Field(1.5, gt=0, description="push margin (half the distance between means)")
    w_var: float = Field(1.0, ge=0)
    w_dist: float = Field(1.0, ge=0)
    w_reg: float = Field(0.001, ge=0)
    w_semantic: float = Field(1.0, ge=0)
    fg_thresh: float = Field(0.5, gt=0, lt=1, description="foreground probability needed to be clustered")
    bandwidth: float | None = Field(None, gt=0, description="mean-shift radius; default delta_d")
    radius: float | None = Field(None, gt=0, description="pixels within this distance of a mode join it; default delta_d")
    shift_iters: int = Field(10, ge=0)
    split_components: bool = Field(True, description="split each cluster into 4-connected components (look-alike "
                                   "objects far apart share an embedding); off keeps an occluded object's separate parts together")
    min_pixels: int = Field(8, ge=1, description="smallest instance kept, pixels")
    max_instances: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _margins(self) -> "DiscLossParams":
        if self.delta_d <= self.delta_v:
            raise ValueError("delta_d must exceed delta_v (clusters could not be told apart)")
        return self


class RSISParams(EmbedNetParams):
    """RSIS (Salvador et al., 2017): the encoder of ``EmbedNetParams`` (``channels`` at strides
    2, 4, ...), then per step a hierarchy of ConvLSTMs, one per entry of ``lstm_channels`` from the
    coarsest encoder stride down, each fed the encoder skip at its stride, the finer-upsampled
    output of the level above and the canvas of masks already emitted; a full-resolution
    refinement emits the step's mask; class and stop heads read the max-pooled hidden states.
    ``classify: pixels`` means that per-step class head (the paper); ``instances`` the
    second-stage crop classifier."""

    lstm_channels: list[int] = Field(default_factory=lambda: [64, 32, 16], min_length=1,
                                     description="ConvLSTM hidden widths, coarse to fine")
    max_steps: int = Field(20, ge=1, le=1000, description="the bound: at most this many instances per image (inference "
                           "and training); objects past it are not found")
    stop_thresh: float = Field(0.5, gt=0, lt=1, description="stop at the first step whose stop probability reaches this")
    mask_thresh: float = Field(0.5, gt=0, lt=1, description="mask probability that makes a pixel part of the step's instance")
    min_pixels: int = Field(8, ge=1, description="smallest instance kept, pixels")
    feed_canvas: bool = Field(True, description="give each step the union of the masks emitted so far")
    foreground: bool = Field(True, description="a foreground head on the encoder (BCE to the union of the instances); "
                             "each step reads the foreground not yet covered by the canvas, and the stop head its max "
                             "and mean (not in the paper)")
    w_fg: float = Field(1.0, ge=0, description="foreground BCE weight")
    pointer: bool = Field(False, description="each step points at one object: a spatial softmax over the coarsest LSTM "
                          "level (which also sees pixel coordinates), fed to the finer levels and the refinement, and "
                          "trained towards the matched object's mask (not in the paper)")
    w_pointer: float = Field(1.0, ge=0, description="pointer cross-entropy weight")
    guided: bool = Field(False, description="with pointer: the pointer picks the object and the mask follows it. In "
                         "training each step is fed (one-hot at the coarsest level) the remaining object its pointer "
                         "rates highest, learns that object's mask (no matching), and its pointer learns a set target "
                         "(any remaining object); the canvas is teacher-forced. At inference the pointer's argmax cell "
                         "is fed (not in the paper)")
    point: bool = Field(False, description="the point variant (segpipe.modeling.rsis_point): each step takes the peak "
                        "of a centre heat map read from its hidden state and the canvas, and a mask head conditioned on "
                        "that point segments the object there; training feeds the remaining object the heat map rates "
                        "highest (no matching) and the heat map learns Gaussian peaks at the remaining objects (not in "
                        "the paper)")
    point_stride: Literal[2, 4, 8] = Field(4, description="point: the heat map's stride, pixels")
    point_width: int = Field(32, ge=4, description="point: width of the heat and mask heads")
    point_scale: float = Field(32.0, gt=0, description="point: pixels per unit of the mask head's relative coordinates")
    point_jitter: bool = Field(True, description="point: training feeds a random core pixel of the chosen object (its "
                               "distance to the background at least half the maximum) instead of the most interior one")
    point_head: Literal["flat", "pyramid"] = Field("flat", description="point: the mask head. flat: two 3x3 convolutions "
                                                   "at stride 2 over the decoder's stride-2 features, the finest hidden "
                                                   "state and the point's coordinates; pyramid: starts at the finest LSTM "
                                                   "level's stride (wide context, cheap) and is upsampled level by level "
                                                   "to stride 2, each level reading the decoder's features there")
    w_heat: float = Field(1.0, ge=0, description="point: heat-map focal loss weight")
    train_steps: int | None = Field(None, ge=1, description="point: training runs at most this many steps per batch (the "
                                    "objects the heat map picks first); the heat map still learns every object left. "
                                    "Default max_steps")
    order_prior: float = Field(0.0, ge=0, description="added matching cost |step - rank| / N, rank = the object's "
                               "order top to bottom (by centroid): breaks the set loss's ties towards one order; 0 = "
                               "the paper's pure Hungarian matching")
    w_mask: float = Field(1.0, ge=0, description="soft-IoU loss weight")
    w_bce: float = Field(1.0, ge=0, description="pixel binary cross-entropy weight on matched pairs (a dense gradient "
                         "that the soft IoU lacks while masks are still blobs)")
    w_step_class: float = Field(1.0, ge=0, description="per-step class cross-entropy weight (classify: pixels)")
    w_stop: float = Field(1.0, ge=0, description="stop binary cross-entropy weight")
    train_only: Literal["all", "classifier"] = Field("all", description="classifier: train the instance classifier "
                                                     "alone (needs --init); everything else is frozen in eval mode and "
                                                     "decodes each batch as at inference, and the classifier learns "
                                                     "from those instances that match a ground-truth one (mask IoU >= "
                                                     "0.5, its label) as well as from the ground-truth masks: it meets "
                                                     "the masks it will be given, not only perfect ones")

    @model_validator(mode="after")
    def _levels(self) -> "RSISParams":
        if len(self.lstm_channels) > len(self.channels):
            raise ValueError(f"lstm_channels: {len(self.lstm_channels)} levels but the encoder has only {len(self.channels)}")
        if self.guided and not (self.pointer and self.feed_canvas):
            raise ValueError("guided: needs pointer and feed_canvas")
        if self.point and (self.pointer or self.guided or not self.feed_canvas):
            raise ValueError("point: needs feed_canvas and replaces pointer and guided (set those false)")
        if self.train_only == "classifier" and self.classify != "instances":
            raise ValueError("train_only: classifier needs the instance classifier (classify: instances)")
        if self.point and self.point_stride > 2 ** (len(self.channels) - 1):
            raise ValueError(f"point_stride: {self.point_stride} is coarser than the decoder's finest-but-one level "
                             f"({2 ** (len(self.channels) - 1)})")
        return self


class ScorerParams(Strict):
    """The ensemble scorer (segpipe.ensemble.scorer): an MLP from a fused instance's ensemble
    features to its mask IoU with the truth."""

    models: list[str] = Field(default_factory=list, description="the ensemble's card names, in feature order (set by "
                              "training from the run it learns from)")
    hidden: int = Field(32, ge=1, description="width of its two hidden layers")


class PointRendParams(Strict):
    """The model-agnostic PointRend refiner (segpipe.refine.pointrend): a small U-Net feature map
    over the image and a point head over fine features + the coarse logit (+ disagreement)."""

    channels: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=2, description="feature U-Net levels")
    full_res_channels: int = Field(8, ge=1)
    context_dilations: list[int] = Field(default_factory=lambda: [2])
    feat_channels: int = Field(16, ge=1, description="fine features per pixel")
    feature_stride: Literal[1, 2] = Field(1, description="1: features at every pixel (a full-resolution branch); 2: at "
                                          "stride 2 (no full-resolution convolutions: about 3x cheaper, the PointRend "
                                          "paper's fine features are at stride 4)")
    fine: Literal["unet", "patch"] = Field("unet", description="the fine features: ``unet``, a small U-Net over the "
                                             "whole image; ``patch``, the image itself read in a ``patch`` x ``patch`` "
                                             "pixel window around each point (no per-image network: the cost follows the "
                                             "points, not the image size)")
    patch: int = Field(7, ge=1, description="with fine=patch: the window side in pixels (odd)")
    coarse_patch: bool = Field(False, description="with fine=patch: also read the coarse map in the same window, so the "
                               "head sees which side of an edge the instance lies on, not only the logit at the point")
    hidden: int = Field(64, ge=1, description="point head width")
    use_disagreement: bool = Field(True, description="feed the members' disagreement (std of their masks) per point")
    margin: float = Field(0.1, ge=0, le=1, description="the frame: the instance box grown by this fraction per side")
    coarse_size: int = Field(28, ge=4, description="side of the coarse map the subdivision starts from")
    output_size: int = Field(112, ge=4, description="largest side of the refined map (coarse_size x 2^k)")
    points: int = Field(256, ge=1, description="points re-predicted per subdivision step")
    train_points: int = Field(196, ge=1, description="points per instance in training")
    oversample: float = Field(3.0, ge=1, description="training: candidate points per kept point")
    importance: float = Field(0.75, ge=0, le=1, description="training: share of points taken by uncertainty")
    max_train_instances: int = Field(32, ge=1, description="training: instances per image at most")
    boundary: float = Field(0.0, ge=0, le=1, description="training: share of points taken within one pixel of the true "
                            "boundary (where a one-pixel error decides mask and Boundary IoU); the rest as ``importance``")
    mild: float = Field(0.0, ge=0, le=1, description="training: share of instances given sub-cell errors (those of a "
                        "good model or an ensemble seen through its soft mask) instead of coarse degradations")
    prior_share: float = Field(1.0, ge=0, le=1, description="training with priors (``segpipe train pointrend --priors "
                               "RUN``): share of the instances that have one (the zoo's fused prediction of the "
                               "object) which learn from it instead of from a degraded copy of the truth")
    certain: float | None = Field(None, gt=0, description="inference: a chosen point whose logit magnitude is at least "
                                  "this is left as it is (|logit| 2 is p < 0.12 or > 0.88); None re-predicts every chosen point")
    render: Literal["grid", "pixels"] = Field("grid", description="inference: ``grid``, subdivide up to about one cell "
                                              "per pixel (at least one step) and resample the map onto the pixels; "
                                              "``pixels``, subdivide while the grid is coarser than the pixels, then "
                                              "re-predict the ``points`` most uncertain pixels on the image's own grid "
                                              "(no sub-pixel cells, no resampling of predictions)")

    @model_validator(mode="after")
    def _window(self) -> "PointRendParams":
        if self.fine == "patch" and self.patch % 2 == 0:
            raise ValueError(f"patch must be odd (a window centred on the point), got {self.patch}")
        if self.coarse_patch and self.fine != "patch":
            raise ValueError("coarse_patch needs fine=patch")
        return self


# --- helpers ------------------------------------------------------------------------------


def apply_overrides(data: dict, overrides: list[str], flag: str = "--set") -> dict:
    """Apply ``dotted.key=value`` overrides (value parsed as YAML) to a nested dict, in place;
    errors name the command-line ``flag`` the overrides came from."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"{flag} {item!r}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ValueError(f"{flag} {item!r}: value is not valid YAML (quote it): {e}") from None
        node: Any = data
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[_list_index(p, node, key)]
                continue
            if p not in node or node[p] is None:
                node[p] = {}
            node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(last, node, key)] = value
        else:
            node[last] = value
    return data


def _list_index(p: str, node: list, key: str) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise ValueError(f"--set {key}: {p!r} is not an index of a list of {len(node)}")
    return int(p)


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> WorkflowConfig:
    """Read a workflow YAML, apply overrides, validate. Raises pydantic.ValidationError / ValueError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a workflow must be a mapping, got {type(data).__name__}")
    apply_overrides(data, overrides or [])
    return WorkflowConfig.model_validate(data)


class SynthSpec(Strict):
    """Parameters of a synthetic shapes dataset (sizes in pixels)."""

    model_config = ConfigDict(frozen=True)  # extra="forbid" comes from Strict

    n: int = Field(100, ge=1, description="number of images")
    seed: int = Field(0, ge=0)
    height: int = Field(256, ge=32)
    width: int = Field(256, ge=32)
    min_objects: int = Field(3, ge=0)
    max_objects: int = Field(12, ge=0)
    min_size: float = Field(8.0, gt=2, description="smallest object diameter")
    max_size: float | None = Field(None, description="largest object diameter; default half the shorter side")
    touching: float = Field(0.3, ge=0, le=1, description="probability an object is placed against another")
    jpeg_quality: tuple[int, int] = (70, 95)
    min_visible: float = Field(0.35, gt=0, le=1, description="drop objects with less of their area visible")

    @model_validator(mode="after")
    def _check(self) -> "SynthSpec":
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError("max_size must be >= min_size")
        return self

    @property
    def largest(self) -> float:
        return self.max_size if self.max_size is not None else min(self.height, self.width) / 2


# Per (method, domain): defaults for the TrainConfig fields a caller does not set. A zoo card
# records the resolved values, so a recipe change never changes an existing model's meaning.
TRAIN_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("maskrcnn", "shapes"): {},
    ("maskrcnn", "nuclei"): {
        "iterations": 3000, "crop": 256, "warmup": 200,
        "params": {
            "resize": False, "box_detections_per_img": 1000, "box_batch_size_per_image": 512,
            "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 1000,
            "rpn_pre_nms_top_n_test": 4000, "rpn_post_nms_top_n_test": 2000,
        },
    },
    ("polarmask", "shapes"): {"iterations": 6000, "lr": 2e-3},
    ("polarmask", "nuclei"): {"iterations": 4000, "crop": 256, "lr": 2e-3, "warmup": 200},
    ("spatialemb", "shapes"): {"iterations": 7000, "warmup": 200,
                               "params": {"channels": [16, 32, 64, 128, 256], "classify": "instances"}},
    ("spatialemb", "nuclei"): {"iterations": 3000, "crop": 256, "warmup": 200},
    ("discloss", "shapes"): {"iterations": 7000, "warmup": 200,
                             "params": {"coord_scale": 16.0, "channels": [16, 32, 64, 128, 256], "classify": "instances",
                                        "split_components": False}},
    ("discloss", "nuclei"): {"iterations": 4000, "crop": 256, "warmup": 200, "params": {"coord_scale": 8.0}},
    ("pointrend", "shapes"): {"iterations": 3000, "warmup": 200, "refine_base": "maskrcnn-shapes"},
    ("pointrend", "nuclei"): {"iterations": 3000, "crop": 256, "warmup": 200, "refine_base": "maskrcnn-nuclei"},
    ("scorer", "shapes"): {"iterations": 4000, "batch_size": 1024, "warmup": 100},
    ("scorer", "nuclei"): {"iterations": 4000, "batch_size": 1024, "warmup": 100},
    ("rsis", "shapes"): {"iterations": 5000, "crop": 160, "warmup": 200,
                         "params": {"lstm_channels": [64, 32], "max_steps": 16, "classify": "instances"}},
    ("rsis", "nuclei"): {"iterations": 4000, "crop": 128, "warmup": 200, "val_tiling": "on",
                         "params": {"channels": [16, 32, 64], "lstm_channels": [32, 16], "max_steps": 100}},
}


class TrainSource(Strict):
    """One COCO training file of a mixed training set (``segpipe train --data A.json[@WEIGHT]``).

    Its images are found at each image record's ``segpipe_uri`` (segpipe's own COCO output and
    pseudo-label sets carry it), else at ``images``/``file_name``; ``images`` defaults to the
    ``images/`` folder beside the file."""

    ann: str = Field(description="COCO instances JSON (path or URI)")
    images: str | None = Field(None, description="folder the images' file_name is relative to")
    weight: float = Field(1.0, gt=0, le=100, description="how often each image is drawn per epoch, relative to weight 1 "
                          "(2: twice; 0.5: a random half of the images each epoch)")

    @staticmethod
    def parse(text: str) -> dict:
        """``PATH`` or ``PATH@WEIGHT`` (the weight a number) -> the fields, validated where used."""
        path, sep, w = text.rpartition("@")
        try:
            weight = float(w) if sep and path else None
        except ValueError:
            weight = None
        return {"ann": text} if weight is None else {"ann": path, "weight": weight}


class TrainConfig(Strict):
    """``segpipe train``: one method on one domain; everything a card needs to reproduce it.

    Fields left unset take the (method, domain) recipe of ``TRAIN_RECIPES`` first, then the
    defaults below."""

    method: Literal["maskrcnn", "polarmask", "spatialemb", "discloss", "rsis", "pointrend", "scorer"] = "maskrcnn"
    domain: Literal["shapes", "nuclei"] = "shapes"
    data: str | None = Field(None, description="nuclei: folder or URI with train.json, val.json, images/; "
                                               "default $SEGPIPE_NUCLEI, else ../shared/data/nuclei")
    sources: list[TrainSource] = Field(default_factory=list, description="COCO training files to train on instead of "
                                       "the domain's training set (labelled and pseudo-labelled, mixed by weight); "
                                       "validation stays the domain's")
    crop: int | None = Field(None, ge=32, description="random square training crops of this side, pixels")
    name: str | None = Field(None, description="zoo name; default '<method>-<domain>'")
    out: str | None = Field(None, description="card folder; default models/<name>")
    work_dir: str = Field("runs/train", description="generated data, checkpoints and logs")
    iterations: int = Field(6000, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup: int = Field(300, ge=0)
    seed: int = 0
    train_n: int = Field(4000, ge=1)
    train_seed: int = 1000
    val_n: int = Field(200, ge=1)
    val_seed: int = 9999
    checkpoint_every: int = Field(500, ge=1)
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train and validate: auto = a GPU when "
                                                   "one is present (the card's hardware line says which)")
    params: dict[str, Any] = Field(default_factory=dict, description="architecture overrides")
    refine_base: str | None = Field(None, description="pointrend: the zoo model whose val predictions the refiner is "
                                    "scored on (default <maskrcnn>-<domain>)")
    priors: str | None = Field(None, description="pointrend: a finished segpipe run over the training images; its "
                               "fused predictions matched to the ground truth become the coarse masks the refiner "
                               "learns from (params.prior_share of them; the rest are degraded truth)")
    val_run: str | None = Field(None, description="scorer: a finished run of the same models over the val images; the "
                                "card's metrics compare the ensemble's AP with and without the scorer on it")
    prior_iou: float = Field(0.5, gt=0, le=1, description="pointrend with priors: the mask IoU a fused prediction needs "
                             "with a ground-truth instance to become its prior")
    init: str | None = Field(None, description="a zoo name or card path of the same method whose weights start the "
                             "training (fine-tuning): tensors whose name and shape match load, the rest start fresh "
                             "(a changed head, say); the card records which")
    val_tiling: Literal["off", "auto", "on"] = Field("off", description="the card's validation runs images larger than "
                                                   "the training crop tile by tile at that crop (auto / on, as "
                                                   "tiling.mode); for methods whose instance count per pass is bounded")

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        recipe = TRAIN_RECIPES.get((data.get("method", "maskrcnn"), data.get("domain", "shapes")), {})
        # None means "not given" (every field whose default is None keeps it when dropped).
        out = {k: v for k, v in recipe.items() if k != "params"} | {k: v for k, v in data.items() if v is not None}
        out["params"] = dict(recipe.get("params", {})) | dict(data.get("params") or {})
        return out

    @model_validator(mode="after")
    def _seeds_apart(self) -> "TrainConfig":
        if self.val_seed == self.train_seed:
            raise ValueError("val_seed must differ from train_seed (validation must be unseen)")
        if self.priors is not None and self.method not in ("pointrend", "scorer"):
            raise ValueError(f"priors: only the pointrend refiner and the ensemble scorer train on a run's predictions, "
                             f"not {self.method}")
        if self.val_run is not None and self.method != "scorer":
            raise ValueError(f"val_run: only the ensemble scorer is scored on a run, not {self.method}")
        if self.sources and self.method in ("scorer", "pointrend") and self.priors is not None:
            raise ValueError(f"sources: {self.method} with priors learns from the run's images; give no --data A.json")
        if self.method == "scorer" and self.sources:
            raise ValueError("sources: the ensemble scorer learns from a run (--priors), not from COCO files")
        if self.method == "scorer" and self.priors is None:
            raise ValueError("priors: the ensemble scorer learns from a run over the training images (--priors RUN)")
        if self.params.get("train_only", "all") != "all" and self.init is None:
            raise ValueError(f"init: --param train_only={self.params['train_only']} trains one part of a network; the "
                             "rest must come from a trained card (--init MODEL)")
        return self

    @property
    def model_name(self) -> str:
        return self.name or f"{self.method}-{self.domain}"
