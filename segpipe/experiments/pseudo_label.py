"""The pseudo-labelling experiment (``segpipe experiment pseudo-label CONFIG``).

Split the domain's training set into a labelled part and an unlabelled rest; train teachers of
several families on the labelled part; label the rest with their ensemble (a ``segpipe run``
with a ``pseudo_label`` section); for each keep-threshold setting write a pseudo-label set and
train a student on labelled + pseudo-labelled; score everything on the domain's val split.

Every step is a ``segpipe`` command run as a subprocess (logs under ``work_dir/logs``) and
skipped when its output exists, so rerunning the same command resumes (trainings resume from
their checkpoints, the labelling run from its committed shards). ``results.json`` is rewritten
after every step with what is known so far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field, field_validator, model_validator

from segpipe.config import EnsembleConfig, KeepRule, Strict

Log = Callable[[str], None]


class SweepPoint(Strict):
    """One keep-threshold setting: its pseudo-label set and student."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    keep: KeepRule = Field(default_factory=KeepRule)
    empty_images: str = Field("drop", pattern="^(drop|keep)$")
    ignore: KeepRule | None = Field(None, description="instances not kept that pass this rule become ignore regions")
    weight: float | None = Field(None, gt=0, le=100, description="the pseudo set's source weight for this "
                                 "point's student (default: the experiment's pseudo_weight)")


class ExperimentConfig(Strict):
    """The experiment, as a YAML file (workflows/experiments/pseudo-label.yaml)."""

    work_dir: str = Field("runs/pl-exp", description="everything the experiment writes")
    domain: str = Field("nuclei", pattern="^nuclei$", description="the domain whose train.json is split")
    data: str | None = Field(None, description="the domain folder (default $SEGPIPE_NUCLEI, else ../shared/data/nuclei)")
    labeled_fraction: float = Field(0.25, gt=0, lt=1)
    split_seed: int = 0
    teachers: list[str] = Field(min_length=2, description="methods trained on the labelled part")
    student: str = Field(description="the method trained on labelled + pseudo-labelled")
    iterations: int = Field(2000, ge=1, description="every training's steps (teachers and students alike)")
    threads: int = Field(1, ge=1, description="torch threads per training")
    jobs: int = Field(2, ge=1, description="trainings run at once")
    pseudo_weight: float = Field(1.0, gt=0, description="the pseudo-labelled set's source weight (labelled: 1)")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="method -> architecture overrides "
                                              "(--param) for its trainings")
    train_args: list[str] = Field(default_factory=list, description="more `segpipe train` options for every training, "
                                  "e.g. [--batch-size, '2']")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    run_overrides: list[str] = Field(default_factory=list, description="--set overrides of the labelling runs")
    sweep: list[SweepPoint] = Field(min_length=1)

    @field_validator("teachers")
    @classmethod
    def _families(cls, v: list[str]) -> list[str]:
        from segpipe.train.methods import METHODS

        bad = [m for m in v if m not in METHODS or METHODS[m].family in ("refinement", "ensemble scorer")]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an instance segmentation method")
        if len({METHODS[m].family for m in v}) < 2:
            raise ValueError(f"teachers must span at least two families, got {[METHODS[m].family for m in v]}")
        return v

    @model_validator(mode="after")
    def _names(self) -> "ExperimentConfig":
        names = [p.name for p in self.sweep]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep: names must be distinct, got {names}")
        return self

    def tag(self) -> str:
        return f"l{round(100 * self.labeled_fraction)}"


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    from segpipe.config import apply_overrides

    data = yaml.safe_load(Path(path).read_text()) or {}
    apply_overrides(data, overrides or [])
    return ExperimentConfig.model_validate(data)


class ExperimentError(RuntimeError):
    """A step of the experiment failed (its log says why)."""


class Experiment:
    """The steps and their outputs under ``cfg.work_dir``."""

    def __init__(self, cfg: ExperimentConfig, log: Log = print, segpipe: list[str] | None = None):
        self.cfg, self.log = cfg, log
        self.w = Path(cfg.work_dir)
        self.segpipe = segpipe or [sys.executable, "-m", "segpipe.cli"]
        prev = self.w / "results.json"
        earlier = json.loads(prev.read_text()) if prev.is_file() else {}
        self.results: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "steps": earlier.get("steps", {})}  # their commands
        self.quality = {row["set_sha256"]: row["set_quality"] for row in earlier.get("students", [])
                        if row.get("set_sha256") and row.get("set_quality")}  # set sha256 -> set_quality(...)

    # --- paths ---------------------------------------------------------------------------------
    def root(self) -> str:
        from segpipe.config import TrainConfig
        from segpipe.train.domains import nuclei_root

        return nuclei_root(TrainConfig(domain="nuclei", data=self.cfg.data))

    def model_dir(self, name: str) -> Path:
        return self.w / "models" / name

    def teacher_name(self, method: str) -> str:
        return f"{method}-{self.cfg.domain}-{self.cfg.tag()}"

    def weight(self, point: SweepPoint) -> float:
        """The pseudo set's source weight in ``point``'s student."""
        return self.cfg.pseudo_weight if point.weight is None else point.weight

    def student_name(self, point: SweepPoint) -> str:
        return f"{self.cfg.student}-{self.cfg.domain}-{self.cfg.tag()}-pl-{point.name}"

    # --- steps ---------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        self.split()
        self.train_all([(m, self.teacher_name(m), [str(self.w / "labeled.json")]) for m in self.cfg.teachers])
        label_run = self.label("pseudo-run", str(self.w / "unlabeled-images"), gt=None)
        val_run = self.label("val-run", str(self.w / "val-images"), gt=f"{self.root()}/val.json")
        sets = {p.name: self.pseudo_set(label_run, p) for p in self.sweep_points()}
        students = []
        for p in self.sweep_points():
            if _set_counts(sets[p.name])["images_written"] == 0:
                self.log(f"{self.student_name(p)}: not trained: the setting keeps no image")
                continue
            data = [str(self.w / "labeled.json"), f"{sets[p.name]}/instances.json@{self.weight(p):g}"]
            students.append((self.cfg.student, self.student_name(p), data))
        self.train_all(students)
        self.results["wall_s_this_call"] = round(time.time() - t0, 1)
        return self.summarise(val_run)

    def sweep_points(self) -> list[SweepPoint]:
        return self.cfg.sweep

    def split(self) -> None:
        """labeled.json (annotated), unlabeled.json (no annotations), unlabeled-images/ and
        val-images/ (links to the domain's images: the labelling runs' sources)."""
        from segpipe.data.coco import read_json
        from segpipe.data.split import split_by_image

        root = self.root()
        self.w.mkdir(parents=True, exist_ok=True)
        lab, unl = self.w / "labeled.json", self.w / "unlabeled.json"
        if not (lab.is_file() and unl.is_file()):
            labeled, unlabeled = split_by_image(read_json(f"{root}/train.json"), self.cfg.labeled_fraction,
                                                self.cfg.split_seed, f"{os.path.abspath(root)}/images")
            for path, doc in ((lab, labeled), (unl, unlabeled)):
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc))
                tmp.replace(path)
        labeled, unlabeled = json.loads(lab.read_text()), json.loads(unl.read_text())
        _link_images(self.w / "unlabeled-images", unlabeled["images"])
        _link_images(self.w / "val-images", [im | {"segpipe_uri": f"{os.path.abspath(root)}/images/{im['file_name']}"}
                                             for im in read_json(f"{root}/val.json")["images"]])
        self.results["split"] = {"labeled": {"images": len(labeled["images"]), "instances": len(labeled["annotations"])},
                                 "unlabeled": {"images": len(unlabeled["images"])},
                                 "fraction": self.cfg.labeled_fraction, "seed": self.cfg.split_seed}
        self.save()

    def train_argv(self, method: str, name: str, data: list[str]) -> list[str]:
        argv = ["train", method, "--domain", self.cfg.domain]
        if self.cfg.data:
            argv += ["--data", self.cfg.data]
        for d in data:
            argv += ["--data", d]
        argv += [a for k, v in self.cfg.params.get(method, {}).items() for a in ("--param", f"{k}={json.dumps(v)}")]
        return argv + ["--iterations", str(self.cfg.iterations), "--threads", str(self.cfg.threads), "--name", name,
                       "--out", str(self.model_dir(name)), "--work-dir", str(self.w / "train"), *self.cfg.train_args]

    def train_all(self, jobs: list[tuple[str, str, list[str]]]) -> None:
        """Train the (method, name, data) models whose card is missing, ``cfg.jobs`` at a time."""
        todo = []
        for job in jobs:
            if (self.model_dir(job[1]) / "card.yaml").is_file():
                self.log(f"{job[1]}: trained (card exists)")
            else:
                todo.append(job)

        def one(job):
            method, name, data = job
            self.command(name, self.train_argv(method, name, data))

        with ThreadPoolExecutor(max_workers=self.cfg.jobs) as pool:
            list(pool.map(one, todo))

    def workflow(self, source: str, out: str, gt: str | None) -> dict:
        """The labelling run: the teachers' ensemble over ``source``, pseudo-labels on."""
        wf = {
            "name": f"pseudo-label-{self.cfg.tag()}",
            "source": {"uri": source, "shard_size": 32},
            "models": [{"model": str(self.model_dir(self.teacher_name(m)) / "card.yaml"), "num_cpus": 0.5,
                        "num_gpus": "auto", "batch_size": 2} for m in self.cfg.teachers],
            "ensemble": self.cfg.ensemble.model_dump(mode="json"),
            "output": {"uri": out, "coco": True, "min_score": 0.05},
            "pipeline": {"read_num_cpus": 0.2, "read_batch_size": 4, "max_error_rate": 0.5},
            "eval": {"max_dets": 1000, **({"gt": gt} if gt else {})},
            "pseudo_label": {"keep": self.cfg.sweep[0].keep.model_dump(mode="json"), "empty_images": self.cfg.sweep[0].empty_images},
        }
        return wf

    def label(self, name: str, source: str, gt: str | None) -> Path:
        out = self.w / name
        manifest = out / "_segpipe" / "run.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "complete":
            self.log(f"{name}: labelled (run.json exists)")
            return out
        wf_path = self.w / "workflows" / f"{name}.yaml"
        wf_path.parent.mkdir(parents=True, exist_ok=True)
        wf_path.write_text(yaml.safe_dump(self.workflow(source, str(out), gt), sort_keys=False))
        argv = ["run", str(wf_path)] + [a for o in self.cfg.run_overrides for a in ("--set", o)]
        plan = out / "_segpipe" / "plan.json"
        if plan.is_file():  # resume the interrupted run: its committed shards are skipped
            argv += ["--run-id", json.loads(plan.read_text())["run_id"]]
        self.command(name, argv)
        return out

    def pseudo_set(self, run: Path, point: SweepPoint) -> Path:
        out = self.w / "sets" / point.name
        want = point.keep.model_dump(mode="json")
        ignore = point.ignore.model_dump(mode="json") if point.ignore is not None else None
        card = out / "card.yaml"
        if card.is_file():
            have = yaml.safe_load(card.read_text())
            if have.get("keep") == want and have.get("empty_images") == point.empty_images and have.get("ignore") == ignore:
                return out
        sets = [a for k, v in want.items() for a in ("--set", f"keep.{k}={v}")]
        sets += ([a for k, v in ignore.items() for a in ("--set", f"ignore.{k}={v}")] if ignore else ["--set", "ignore=null"])
        self.command(f"set-{point.name}", ["pseudo-label", str(run), "--out", str(out), *sets,
                                           "--set", f"empty_images={point.empty_images}"])
        return out

    def command(self, name: str, argv: list[str]) -> None:
        """Run ``segpipe ARGV`` with its output in logs/<name>.log; raise when it fails."""
        logs = self.w / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cmd = "segpipe " + " ".join(argv)
        self.results["steps"].setdefault(name, {})["command"] = cmd
        self.log(f"{name}: {cmd}")
        t = time.time()
        with open(logs / f"{name}.log", "a") as f:
            rc = subprocess.run(self.segpipe + argv, stdout=f, stderr=subprocess.STDOUT).returncode
        self.results["steps"][name] |= {"rc": rc, "wall_s": round(time.time() - t, 1)}
        self.save()
        if rc != 0:
            raise ExperimentError(f"{name} failed (exit {rc}); see {logs / f'{name}.log'}")

    # --- results -------------------------------------------------------------------------------
    def summarise(self, val_run: Path) -> dict:
        from segpipe.data.coco import read_json
        from segpipe.experiments.set_quality import set_quality

        r = self.results
        r["teachers"] = {m: _card_metrics(self.model_dir(self.teacher_name(m))) for m in self.cfg.teachers}
        manifest = json.loads((val_run / "_segpipe" / "run.json").read_text())
        ev = manifest.get("eval") or {}
        r["ensemble"] = {"AP": ev.get("AP"), "AP50": ev.get("AP50"), "AP75": ev.get("AP75"), "run": str(val_run),
                         "per_model_in_run": {k: v.get("AP") for k, v in (ev.get("per_model") or {}).items()}}
        best_name, best = max(r["teachers"].items(), key=lambda kv: kv[1]["AP"])
        labeled_only = r["teachers"].get(self.cfg.student)
        r["best_teacher"] = {"method": best_name, "AP": best["AP"]}
        r["labeled_only"] = ({"method": self.cfg.student, "AP": labeled_only["AP"]} if labeled_only else None)
        r["students"] = []
        for p in self.sweep_points():
            s_dir = self.model_dir(self.student_name(p))
            set_card = yaml.safe_load((self.w / "sets" / p.name / "card.yaml").read_text())
            if set_card["sha256"] not in self.quality:
                self.quality[set_card["sha256"]] = set_quality(read_json(str(self.w / "sets" / p.name / "instances.json")),
                                                               self.truth())
            row = {"setting": p.name, "keep": p.keep.model_dump(mode="json"),
                   "ignore": p.ignore.model_dump(mode="json") if p.ignore is not None else None, "set": set_card["counts"],
                   "weight": self.weight(p),
                   "set_sha256": set_card["sha256"], "set_quality": self.quality[set_card["sha256"]],
                   "model": self.student_name(p)}
            if set_card["counts"]["images_written"] == 0:
                row["skipped"] = "the setting keeps no image"
            elif (s_dir / "card.yaml").is_file():
                m = _card_metrics(s_dir)
                row |= {"metrics": m, "vs_best_teacher": round(m["AP"] - best["AP"], 4)}
                if labeled_only:
                    row["vs_labeled_only"] = round(m["AP"] - labeled_only["AP"], 4)
            r["students"].append(row)
        self.save()
        return r

    def truth(self) -> dict:
        """The unlabelled part's thrown-away labels (train.json restricted to its images): only for
        ``set_quality``, a diagnostic; nothing is chosen by it."""
        from segpipe.data.coco import read_json

        if not hasattr(self, "_truth"):
            names = {im["file_name"] for im in json.loads((self.w / "unlabeled.json").read_text())["images"]}
            doc = read_json(f"{self.root()}/train.json")
            ids = {im["id"] for im in doc["images"] if im["file_name"] in names}
            self._truth = doc | {"images": [im for im in doc["images"] if im["id"] in ids],
                                 "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}
        return self._truth

    def save(self) -> None:
        self.w.mkdir(parents=True, exist_ok=True)
        tmp = self.w / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2))
        tmp.replace(self.w / "results.json")


def _set_counts(set_dir: Path) -> dict:
    return yaml.safe_load((set_dir / "card.yaml").read_text())["counts"]


def _card_metrics(model_dir: Path) -> dict:
    card = yaml.safe_load((model_dir / "card.yaml").read_text())
    values = card["metrics"][0]["values"]
    from segpipe.config import ModelCard

    version = ModelCard.model_validate(card).version()
    return {"version": version, **{k: values[k] for k in ("AP", "AP50", "AP75") if k in values},
            "split": card["metrics"][0]["split"], "wall_time_s": card["training"]["wall_time_s"],
            "command": card["training"]["command"]}


def _link_images(folder: Path, images: list[dict]) -> None:
    """A folder of symbolic links, one per image record (its ``segpipe_uri``, a local path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        link = folder / Path(im["file_name"]).name
        if not link.exists():
            link.symlink_to(im["segpipe_uri"])
