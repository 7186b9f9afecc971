"""infra/: every manifest parses, and the fields that matter hold: images tagged with this
project's version and the right variant, GPU resources and the node label workflows prefer, Ray
versions that match, entrypoints the CLI accepts with workflows (shipped in the image) that
validate, clusters named consistently, credentials only by reference, and a Dockerfile whose
image runs segpipe. Fast: no cluster, no docker daemon."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

from conftest import REPO

INFRA = REPO / "infra"
EXPECTED_FILES = {
    "README.md",
    "docker/Dockerfile",
    "docker/Dockerfile.dockerignore",
    "kuberay/ray-cluster.cpu.yaml",
    "kuberay/ray-cluster.gpu.yaml",
    "kuberay/ray-job.label.yaml",
    "kuberay/cronjob.label-incremental.yaml",
    "ray-up/cluster.aws.yaml",
}
GPU_CLUSTER = "kuberay/ray-cluster.gpu.yaml"
CPU_CLUSTER = "kuberay/ray-cluster.cpu.yaml"
RAY_JOB = "kuberay/ray-job.label.yaml"
CRON_JOB = "kuberay/cronjob.label-incremental.yaml"
RAY_UP = "ray-up/cluster.aws.yaml"
KIND_PREFIX = {"RayCluster": "ray-cluster", "RayJob": "ray-job", "CronJob": "cronjob"}
MODEL_LABEL = {"segpipe-role": "model"}  # what GPU nodes carry and models[].node_labels prefers
DASHBOARD_PORT = 8265
IMAGE_RE = re.compile(r"^ghcr\.io/segpipe/segpipe:(?P<version>[^-\s]+)-(?P<variant>cpu|cuda)$")
CREDENTIAL_NAME = re.compile(r"^AWS_|SECRET|TOKEN|PASSWORD|KEY", re.IGNORECASE)
IMAGE_KEYS = ("image", "head_image", "worker_image")


# --- loading ------------------------------------------------------------------------------


def _project_version() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed metadata is the same pyproject
        from importlib.metadata import version

        return version("segpipe")
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def _load_all() -> dict[str, list]:
    out = {}
    for p in sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")]):
        rel = p.relative_to(INFRA).as_posix()
        try:
            docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        except yaml.YAMLError as e:
            pytest.fail(f"infra/{rel}: not valid YAML: {e}")
        assert docs, f"infra/{rel}: no document"
        assert all(isinstance(d, dict) for d in docs), f"infra/{rel}: every document must be a mapping"
        out[rel] = docs
    return out


@pytest.fixture(scope="module")
def manifests() -> dict[str, list]:
    return _load_all()


def _doc(manifests: dict, rel: str, kind: str | None = None) -> dict:
    assert rel in manifests, f"infra/{rel}: missing"
    docs = [d for d in manifests[rel] if kind is None or d.get("kind") == kind]
    assert len(docs) == 1, f"infra/{rel}: expected one {kind or 'document'}, found {len(docs)}"
    return docs[0]


def _walk(node, path: str = ""):
    """Every (dotted path, key, value) of a parsed manifest, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}" if path else str(k)
            yield p, k, v
            yield from _walk(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _pod_containers(pod_template: dict, path: str) -> list[tuple[str, dict]]:
    spec = pod_template.get("spec") or {}
    return [(f"{path}.spec.{key}[{i}]", c) for key in ("initContainers", "containers")
            for i, c in enumerate(spec.get(key) or [])]


def _gpus(container: dict, section: str) -> int:
    return int((container.get("resources") or {}).get(section, {}).get("nvidia.com/gpu", 0))


def _labels(raw) -> dict[str, str]:
    """`ray start --labels` value: `k1=v1,k2=v2` (or a mapping / the older JSON form)."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    raw = str(raw or "").strip()
    if raw.startswith("{"):
        return {str(k): str(v) for k, v in json.loads(raw).items()}
    return dict(kv.split("=", 1) for kv in raw.split(",") if kv)


# --- the Dockerfile -------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in (INFRA / "docker" / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line = buf + line
        buf = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not buf, "infra/docker/Dockerfile: ends inside a line continuation"
    return out


def _dockerfile() -> dict:
    """Global ARG defaults, stages (name -> base, instructions) and the last stage's name."""
    global_args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current = None
    for word, rest in _dockerfile_instructions():
        if word == "FROM":
            tokens = [t for t in rest.split() if not t.startswith("--")]
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = {"base": tokens[0], "instructions": []}
        elif current is None:
            assert word == "ARG", f"infra/docker/Dockerfile: {word} before the first FROM"
            k, _, v = rest.partition("=")
            global_args[k] = v
        else:
            current["instructions"].append((word, rest))
    assert stages, "infra/docker/Dockerfile: no FROM"
    return {"args": global_args, "stages": stages, "final": list(stages)[-1]}


def _stage_values(stage: dict, word: str) -> list[str]:
    return [rest for w, rest in stage["instructions"] if w == word]


def _env(stage: dict) -> dict[str, str]:
    env = {}
    for rest in _stage_values(stage, "ENV"):
        for tok in shlex.split(rest):
            k, _, v = tok.partition("=")
            env[k] = v
    return env


def _image_copies(df: dict) -> dict[str, str]:
    """Absolute path in the final image -> repository path, for every COPY of the final stage."""
    workdir = PurePosixPath("/")
    out = {}
    for word, rest in df["stages"][df["final"]]["instructions"]:
        if word == "WORKDIR":
            workdir = workdir / rest
        elif word == "COPY":
            tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
            srcs, dest = tokens[:-1], tokens[-1]
            into_dir = dest.endswith("/") or len(srcs) > 1
            dest_path = workdir / dest
            for src in srcs:
                target = dest_path / PurePosixPath(src).name if into_dir else dest_path
                out[str(PurePosixPath(*[p for p in target.parts if p != "."]))] = src.rstrip("/")
    return out


def _repo_path_of(image_path: str, df: dict) -> Path | None:
    """The repository file that the image holds at ``image_path`` (None if no COPY puts it there)."""
    for dest, src in _image_copies(df).items():
        if image_path == dest or image_path.startswith(dest + "/"):
            return REPO / src / image_path[len(dest):].lstrip("/")
    return None


# --- the CLI --------------------------------------------------------------------------------


def _cli_parse(argv: list[str], where: str) -> tuple[str, dict]:
    """Check ``argv`` against segpipe's own CLI (commands, options, parsing); returns the command
    path (e.g. 'submit') and its parsed params. Duck-typed: recent typer vendors its own click."""
    import typer

    from segpipe.cli import app

    assert argv and argv[0] == "segpipe", f"{where}: runs {argv[:1]}, not segpipe"
    cmd = typer.main.get_command(app)
    names, rest = [], list(argv[1:])
    while hasattr(cmd, "commands"):  # a group
        assert rest, f"{where}: no segpipe command"
        sub = cmd.commands.get(rest[0])
        assert sub is not None, f"{where}: {rest[0]!r} is not a segpipe command (have {sorted(cmd.commands)})"
        names.append(rest.pop(0))
        cmd = sub
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    unknown = [a.split("=", 1)[0] for a in rest if a.startswith("-") and a.split("=", 1)[0] not in opts]
    assert not unknown, f"{where}: segpipe {' '.join(names)} has no option {unknown} (has {sorted(opts)})"
    try:
        ctx = cmd.make_context(f"segpipe {' '.join(names)}", rest)
    except Exception as e:  # click's UsageError / BadParameter / MissingParameter
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        pytest.fail(f"{where}: segpipe {' '.join(names)} rejects its arguments: {message}")
    return " ".join(names), ctx.params


def _workflow_of(params: dict, where: str, df: dict):
    """Validate the command's workflow, found in the repository where the image copies it from,
    with the command's --set overrides; returns (repository path, WorkflowConfig)."""
    from segpipe.config import load_workflow

    image_path = str(params["workflow"])
    assert image_path.startswith("/"), f"{where}: workflow {image_path} must be an absolute path in the image"
    repo_path = _repo_path_of(image_path, df)
    assert repo_path is not None, f"{where}: infra/docker/Dockerfile copies nothing to {image_path}"
    assert repo_path.is_file(), f"{where}: {image_path} is {repo_path.relative_to(REPO)} in the repository, which does not exist"
    try:
        cfg = load_workflow(repo_path, list(params.get("set_") or []))
    except Exception as e:  # pydantic.ValidationError, ValueError
        pytest.fail(f"{where}: {repo_path.relative_to(REPO)} with its --set overrides does not validate: {e}")
    for m in cfg.models:
        if "/" not in m.model and not m.model.endswith(".yaml"):
            assert (REPO / "models" / m.model / "card.yaml").is_file(), f"{where}: zoo entry {m.model} not in models/"
    return repo_path, cfg


def _cluster_name(manifests) -> str:
    return _doc(manifests, GPU_CLUSTER, "RayCluster")["metadata"]["name"]


def _head_dashboard_port(manifests) -> int | None:
    """The dashboard (Jobs API) port the GPU cluster's head exposes, None when it does not."""
    head = _doc(manifests, GPU_CLUSTER, "RayCluster")["spec"]["headGroupSpec"]
    ports = [p["containerPort"] for _, c in _pod_containers(head["template"], "head") for p in c.get("ports") or []]
    return DASHBOARD_PORT if DASHBOARD_PORT in ports else None


# --- credentials ----------------------------------------------------------------------------


def _credential_env_by_value(doc) -> list[str]:
    """Paths of env entries named like a credential that do not read a Secret by reference."""
    bad = []
    for path, key, value in _walk(doc):
        if key != "env" or not isinstance(value, list):
            continue
        for i, e in enumerate(value):
            if not isinstance(e, dict) or not CREDENTIAL_NAME.search(str(e.get("name", ""))):
                continue
            ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
            if "value" in e or not (ref.get("name") and ref.get("key")):
                bad.append(f"{path}[{i}] ({e.get('name')})")
    return bad


def _leaks(text: str) -> list[str]:
    found = re.findall(r"AKIA[0-9A-Z]{16}", text)
    if "aws_secret_access_key:" in text.lower():
        found.append("aws_secret_access_key:")
    return found


# --- tests ----------------------------------------------------------------------------------


def test_expected_files_exist_and_every_manifest_parses(manifests):
    present = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert EXPECTED_FILES <= present, f"infra/: missing {sorted(EXPECTED_FILES - present)}"
    yamls = {p for p in present if p.endswith((".yaml", ".yml"))}
    assert yamls == {p for p in EXPECTED_FILES if p.endswith(".yaml")}, \
        f"infra/: unexpected manifests {sorted(yamls - EXPECTED_FILES)} (add them to EXPECTED_FILES and to these tests)"
    assert set(manifests) == yamls
    readme = (INFRA / "README.md").read_text()
    for rel in EXPECTED_FILES - {"README.md"}:
        assert rel in readme, f"infra/README.md: does not describe {rel}"


def test_manifests_are_named_by_kind_and_variant(manifests):
    for rel, docs in manifests.items():
        folder, name = rel.split("/", 1)
        parts = name.split(".")
        assert len(parts) == 3, f"infra/{rel}: name it <kind>.<variant>.yaml"
        if folder == "kuberay":
            kind = docs[0].get("kind")
            assert kind in KIND_PREFIX, f"infra/{rel}: kind {kind} is not one of {sorted(KIND_PREFIX)} (add it to these tests)"
            assert KIND_PREFIX[kind] == parts[0], f"infra/{rel}: a {kind} should be named {KIND_PREFIX[kind]}.<variant>.yaml"
        else:
            assert folder == "ray-up" and parts[0] == "cluster", f"infra/{rel}: unexpected"
            assert docs[0]["provider"]["type"] == parts[1], f"infra/{rel}: provider.type is not {parts[1]}"
    gpu = _doc(manifests, GPU_CLUSTER, "RayCluster")
    cpu = _doc(manifests, CPU_CLUSTER, "RayCluster")
    assert any(_gpus(c, "limits") for g in gpu["spec"]["workerGroupSpecs"] for _, c in _pod_containers(g["template"], "")), \
        f"infra/{GPU_CLUSTER}: no GPU worker group"
    assert not [p for p, k, _ in _walk(cpu) if k == "nvidia.com/gpu"], f"infra/{CPU_CLUSTER}: asks for GPUs"


def test_every_image_is_this_version_of_segpipe(manifests):
    version = _project_version()
    found = 0
    for rel, docs in manifests.items():
        for doc in docs:
            for path, key, value in _walk(doc):
                if key not in IMAGE_KEYS or not isinstance(value, str):
                    continue
                found += 1
                m = IMAGE_RE.match(value)
                assert m, f"infra/{rel}: {path} = {value!r} is not ghcr.io/segpipe/segpipe:<version>-<cpu|cuda>"
                assert m["version"] == version, f"infra/{rel}: {path} = {value!r}, but pyproject.toml's version is {version}"
    assert found >= 8, "the image walk found too few images: did the manifests' layout change?"


def _expected_variants(rel: str, doc: dict) -> list[tuple[str, str, str]]:
    """(field path, image, expected variant): heads and submitters -cpu, GPU workers -cuda."""
    out = []

    def cluster(spec: dict, prefix: str) -> None:
        head = spec["headGroupSpec"]["template"]
        out.extend((p, c.get("image"), "cpu") for p, c in _pod_containers(head, f"{prefix}.headGroupSpec.template"))
        for i, g in enumerate(spec.get("workerGroupSpecs") or []):
            conts = _pod_containers(g["template"], f"{prefix}.workerGroupSpecs[{i}].template")
            variant = "cuda" if any(_gpus(c, "limits") or _gpus(c, "requests") for _, c in conts) else "cpu"
            out.extend((p, c.get("image"), variant) for p, c in conts)

    kind = doc.get("kind")
    if kind == "RayCluster":
        cluster(doc["spec"], "spec")
    elif kind == "RayJob":
        if doc["spec"].get("rayClusterSpec"):
            cluster(doc["spec"]["rayClusterSpec"], "spec.rayClusterSpec")
        if doc["spec"].get("submitterPodTemplate"):
            out.extend((p, c.get("image"), "cpu")
                       for p, c in _pod_containers(doc["spec"]["submitterPodTemplate"], "spec.submitterPodTemplate"))
    elif kind == "CronJob":
        out.extend((p, c.get("image"), "cpu")
                   for p, c in _pod_containers(doc["spec"]["jobTemplate"]["spec"]["template"], "spec.jobTemplate.spec.template"))
    elif "available_node_types" in doc:  # ray up
        docker = doc.get("docker") or {}
        for name, nt in doc["available_node_types"].items():
            own = nt.get("docker") or {}
            is_head = name == doc["head_node_type"]
            key = "head_image" if is_head else "worker_image"
            image = own.get(key) or own.get("image") or docker.get(key) or docker.get("image")
            variant = "cuda" if (nt.get("resources") or {}).get("GPU", 0) else "cpu"
            assert not (is_head and variant == "cuda"), f"infra/{rel}: available_node_types.{name}: the head has GPUs"
            out.append((f"available_node_types.{name} ({key})", image, variant))
    else:
        pytest.fail(f"infra/{rel}: unknown kind of manifest")
    assert out, f"infra/{rel}: no container images"
    return out


def test_heads_run_the_cpu_image_and_gpu_workers_the_cuda_image(manifests):
    for rel, docs in manifests.items():
        for doc in docs:
            for path, image, variant in _expected_variants(rel, doc):
                m = IMAGE_RE.match(str(image))
                assert m and m["variant"] == variant, f"infra/{rel}: {path} = {image!r}, expected the -{variant} image"


@pytest.mark.parametrize("rel", [GPU_CLUSTER, CPU_CLUSTER])
def test_cluster_heads_serve_the_dashboard(manifests, rel):
    spec = _doc(manifests, rel, "RayCluster")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", \
        f"infra/{rel}: spec.headGroupSpec.rayStartParams.dashboard-host must be 0.0.0.0 (the Jobs API is reached from other pods)"
    ports = [p.get("containerPort") for _, c in _pod_containers(head["template"], "") for p in c.get("ports") or []]
    assert DASHBOARD_PORT in ports, f"infra/{rel}: spec.headGroupSpec containers do not expose port {DASHBOARD_PORT}"
    assert not [p for p, k, _ in _walk(head) if k == "nvidia.com/gpu"], f"infra/{rel}: spec.headGroupSpec asks for GPUs"


def test_gpu_workers_request_gpus_and_carry_the_model_label(manifests):
    from segpipe.config import ModelStageConfig

    spec = _doc(manifests, GPU_CLUSTER, "RayCluster")["spec"]
    gpu_groups = 0
    for i, g in enumerate(spec["workerGroupSpecs"]):
        where = f"infra/{GPU_CLUSTER}: spec.workerGroupSpecs[{i}] ({g.get('groupName')})"
        conts = _pod_containers(g["template"], "")
        if not any(_gpus(c, "limits") or _gpus(c, "requests") for _, c in conts):
            continue
        gpu_groups += 1
        for _, c in conts:
            req, lim = _gpus(c, "requests"), _gpus(c, "limits")
            assert req >= 1 and lim >= 1, f"{where}: container {c.get('name')} needs nvidia.com/gpu in both requests and limits"
            assert req == lim, f"{where}: container {c.get('name')}: nvidia.com/gpu requests {req} != limits {lim}"
        labels = _labels((g.get("rayStartParams") or {}).get("labels"))
        assert labels.items() >= MODEL_LABEL.items(), f"{where}: rayStartParams.labels {labels} lack {MODEL_LABEL}"
        assert g.get("maxReplicas", 1) >= g.get("minReplicas", 0), f"{where}: maxReplicas < minReplicas"
    assert gpu_groups, f"infra/{GPU_CLUSTER}: spec.workerGroupSpecs: no group asks for nvidia.com/gpu"
    # the label is what a workflow's models[].node_labels selects
    placement = ModelStageConfig(model="maskrcnn-shapes", node_labels=MODEL_LABEL).placement()
    assert placement["label_selector"] == MODEL_LABEL


def test_ray_versions_match(manifests):
    import ray

    installed = ray.__version__
    versions = {}
    for rel, docs in manifests.items():
        for doc in docs:
            for path, key, value in _walk(doc):
                if key == "rayVersion":
                    versions[f"{rel}: {path}"] = str(value)
    assert {r.split(":")[0] for r in versions} >= {GPU_CLUSTER, CPU_CLUSTER}, f"rayVersion missing: {versions}"
    for where, v in versions.items():
        assert v.split(".")[:2] == installed.split(".")[:2], f"infra/{where} = {v}, but the installed ray is {installed}"
    df = _dockerfile()
    pinned = [rest.partition("=")[2] for w, rest in df["stages"][df["final"]]["instructions"]
              if w == "ARG" and rest.startswith("RAY_VERSION=")]
    assert pinned, "infra/docker/Dockerfile: the final stage has no ARG RAY_VERSION=<version> pin"
    for where, v in versions.items():
        assert v == pinned[0], f"infra/{where} = {v}, but infra/docker/Dockerfile pins RAY_VERSION={pinned[0]}"


def test_ray_up_config(manifests):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _doc(manifests, RAY_UP)
    try:
        validate_config(prepare_config(cfg))  # Ray's own schema, with the provider's defaults filled in
    except Exception as e:
        pytest.fail(f"infra/{RAY_UP}: ray up would reject it: {type(e).__name__}: {str(e)[:500]}")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    workers = {n: t for n, t in types.items() if n != head}
    gpu = {n: t for n, t in workers.items() if (t.get("resources") or {}).get("GPU", 0) >= 1}
    assert gpu, f"infra/{RAY_UP}: available_node_types: no worker type with resources.GPU"
    for name, t in gpu.items():
        assert t.get("max_workers", 0) >= 1, f"infra/{RAY_UP}: available_node_types.{name}.max_workers must be >= 1"
        assert _labels(t.get("labels")).items() >= MODEL_LABEL.items(), \
            f"infra/{RAY_UP}: available_node_types.{name}.labels lack {MODEL_LABEL}"
        commands = t.get("worker_start_ray_commands") or cfg["worker_start_ray_commands"]
        starts = [shlex.split(c) for c in commands if c.split()[:2] == ["ray", "start"]]
        assert starts, f"infra/{RAY_UP}: worker_start_ray_commands do not run ray start"
        for argv in starts:
            labels: dict[str, str] = {}
            for i, a in enumerate(argv):
                if a.startswith("--labels="):
                    labels.update(_labels(a.split("=", 1)[1]))
                elif a == "--labels" and i + 1 < len(argv):
                    labels.update(_labels(argv[i + 1]))
            assert labels.items() >= MODEL_LABEL.items(), \
                f"infra/{RAY_UP}: worker_start_ray_commands: {' '.join(argv)} lacks --labels with {MODEL_LABEL}"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=0.0.0.0" in head_start, \
        f"infra/{RAY_UP}: head_start_ray_commands must start the head with --dashboard-host=0.0.0.0"
    run_options = " ".join((cfg.get("docker") or {}).get("run_options") or [])
    assert re.search(r"--entrypoint[ =](\"\"|'')", run_options), \
        f"infra/{RAY_UP}: docker.run_options must clear the image's ENTRYPOINT (segpipe): ray up starts the container with bash"


def test_dockerfile_builds_a_segpipe_image_in_two_variants():
    df = _dockerfile()
    where = "infra/docker/Dockerfile"
    assert df["args"].get("VARIANT") == "cpu", f"{where}: ARG VARIANT must default to cpu (got {df['args'].get('VARIANT')!r})"
    stages = df["stages"]
    for variant in ("cpu", "cuda"):
        assert f"base-{variant}" in stages, f"{where}: no stage base-{variant}"
        base = stages[f"base-{variant}"]["base"]
        resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: df["args"].get(m[1], m[0]), base)
        assert ("cuda" in resolved) == (variant == "cuda"), f"{where}: stage base-{variant} is FROM {resolved}"
        index = _env(stages[f"base-{variant}"]).get("TORCH_INDEX", "")
        assert re.search(r"/whl/cu\d+$" if variant == "cuda" else r"/whl/cpu$", index), \
            f"{where}: stage base-{variant}: TORCH_INDEX {index!r} is not the {variant} torch index"
    final = stages[df["final"]]
    assert final["base"] in ("base-${VARIANT}", "base-$VARIANT"), \
        f"{where}: the final FROM is {final['base']}, not base-${{VARIANT}}"
    entry = _stage_values(final, "ENTRYPOINT")
    assert entry and json.loads(entry[-1]) == ["segpipe"], f"{where}: ENTRYPOINT must be [\"segpipe\"] (got {entry})"
    copied = set(_image_copies(df).values())
    for src in ("segpipe", "models", "workflows", "pyproject.toml"):
        assert src in copied, f"{where}: the final stage does not COPY {src}"
    installs = [shlex.split(r) for r in _stage_values(final, "RUN")]
    assert any("pip" in argv and "install" in argv and "." in argv for argv in installs), \
        f"{where}: no RUN pip install ... . (the project itself)"
    users = _stage_values(final, "USER")
    assert users and users[-1] not in ("root", "0"), f"{where}: the image should run as a non-root USER"
    # the build context keeps what the image copies (BuildKit's <Dockerfile>.dockerignore)
    rules = [r.strip() for r in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    for src in copied:
        excluded = False
        for rule in rules:
            neg = rule.startswith("!")
            if fnmatch.fnmatch(src, rule.lstrip("!").rstrip("/")):
                excluded = not neg
        assert not excluded, f"infra/docker/Dockerfile.dockerignore: excludes {src}, which the Dockerfile copies"


def test_image_paths_map_to_the_repository():
    df = _dockerfile()
    assert _repo_path_of("/opt/segpipe/workflows/label-incremental.yaml", df) == REPO / "workflows" / "label-incremental.yaml"
    assert _repo_path_of("/opt/segpipe/segpipe/cli.py", df) == REPO / "segpipe" / "cli.py"
    assert _repo_path_of("/etc/passwd", df) is None


def test_ray_job_entrypoint_runs_a_valid_workflow_on_the_gpu_cluster(manifests):
    rel = RAY_JOB
    job = _doc(manifests, rel, "RayJob")
    spec = job["spec"]
    selected = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
    assert selected == _cluster_name(manifests), \
        f"infra/{rel}: spec.clusterSelector ray.io/cluster = {selected!r}, not the RayCluster of {GPU_CLUSTER}"
    assert not spec.get("backoffLimit"), \
        f"infra/{rel}: spec.backoffLimit with clusterSelector: a retry would tear down the selected RayCluster"
    argv = shlex.split(spec["entrypoint"])
    command, params = _cli_parse(argv, f"infra/{rel}: spec.entrypoint")
    assert command in ("run", "submit"), f"infra/{rel}: spec.entrypoint runs segpipe {command}, not a workflow"
    _, cfg = _workflow_of(params, f"infra/{rel}: spec.entrypoint", _dockerfile())
    if command == "run":  # the entrypoint is the job's driver, on the cluster: join it, not an embedded Ray
        assert cfg.pipeline.ray_address == "auto", \
            f"infra/{rel}: spec.entrypoint: segpipe run needs --set pipeline.ray_address=auto (got {cfg.pipeline.ray_address!r})"
    for sec in ("source", "output"):
        uri = getattr(cfg, sec).uri
        assert uri.startswith("s3://"), f"infra/{rel}: spec.entrypoint: {sec}.uri {uri!r} must be s3:// (every node reads it)"


def test_cronjob_submits_the_incremental_workflow_hourly(manifests):
    rel = CRON_JOB
    cron = _doc(manifests, rel, "CronJob")
    assert cron["apiVersion"] == "batch/v1", f"infra/{rel}: apiVersion {cron['apiVersion']}"
    spec = cron["spec"]
    assert spec["schedule"] in ("0 * * * *", "@hourly"), f"infra/{rel}: spec.schedule {spec['schedule']!r} is not hourly"
    assert spec.get("concurrencyPolicy") == "Forbid", f"infra/{rel}: spec.concurrencyPolicy must be Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]
    assert pod["spec"].get("restartPolicy") in ("Never", "OnFailure"), f"infra/{rel}: restartPolicy"
    conts = _pod_containers(pod, "spec.jobTemplate.spec.template")
    assert len(conts) == 1, f"infra/{rel}: expected one container"
    path, c = conts[0]
    df = _dockerfile()
    entry = json.loads(_stage_values(df["stages"][df["final"]], "ENTRYPOINT")[-1])
    argv = [*(c.get("command") or entry), *[str(a) for a in c.get("args") or []]]
    where = f"infra/{rel}: {path}.args"
    command, params = _cli_parse(argv, where)
    assert command == "submit", f"{where}: runs segpipe {command}, not segpipe submit"
    assert params["wait"], f"{where}: without --wait the Job ends at submission and Forbid cannot prevent overlaps"
    assert params["ship_code"] is False, f"{where}: the image has segpipe installed: pass --no-ship-code"
    address = urlparse(params["address"])
    head_svc = f"{_cluster_name(manifests)}-head-svc"
    assert address.scheme == "http" and address.hostname == head_svc and address.port == _head_dashboard_port(manifests), \
        f"{where}: --address {params['address']} is not http://{head_svc}:{DASHBOARD_PORT} (the RayCluster of {GPU_CLUSTER})"
    repo_path, cfg = _workflow_of(params, where, df)
    assert repo_path == REPO / "workflows" / "label-incremental.yaml", f"{where}: runs {repo_path.name}"
    assert cfg.incremental is not None, f"{where}: the scheduled workflow must be incremental"
    for sec in ("source", "output"):
        uri = getattr(cfg, sec).uri
        assert uri.startswith("s3://"), f"{where}: {sec}.uri {uri!r} must be s3:// (the cluster reads it, not this pod)"


def test_cli_check_catches_unknown_commands_options_and_bad_arguments():
    ok = ["segpipe", "submit", "/w.yaml", "--address", "http://h:8265", "--no-ship-code"]
    assert _cli_parse(ok, "ok")[0] == "submit"
    assert _cli_parse(["segpipe", "models", "list"], "ok")[0] == "models list"
    for argv, msg in [(["segpipe", "label", "/w.yaml"], "not a segpipe command"),
                      ([*ok, "--adress", "x"], "has no option"),
                      (["segpipe", "run", "/w.yaml", "--address", "x"], "has no option"),
                      (["segpipe", "submit", "/w.yaml"], "rejects its arguments"),  # --address is required
                      (["python", "-m", "segpipe"], "not segpipe")]:
        with pytest.raises((AssertionError, pytest.fail.Exception), match=msg):
            _cli_parse(argv, "probe")


def test_credentials_only_by_reference(manifests):
    for rel, docs in manifests.items():
        for doc in docs:
            bad = _credential_env_by_value(doc)
            assert not bad, f"infra/{rel}: credential env not from a secretKeyRef: {bad}"
            assert doc.get("kind") != "Secret", f"infra/{rel}: a Secret manifest holds credentials by value; reference one"
    for p in INFRA.rglob("*"):
        if p.is_file():
            leaks = _leaks(p.read_text(errors="replace"))
            assert not leaks, f"infra/{p.relative_to(INFRA)}: looks like a credential: {leaks}"
    # the clusters do get credentials, by reference
    for rel in (GPU_CLUSTER, CPU_CLUSTER):
        refs = [e["name"] for _, k, v in _walk(_doc(manifests, rel)) if k == "env" for e in v
                if (e.get("valueFrom") or {}).get("secretKeyRef")]
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(refs), f"infra/{rel}: no S3 credentials by reference"


def test_credential_checks_catch_values():
    docs = _load_all()
    cluster = copy.deepcopy(_doc(docs, GPU_CLUSTER, "RayCluster"))
    assert _credential_env_by_value(cluster) == []
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"},
                   {"name": "HF_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "t"}}},
                   {"name": "DB_PASSWORD", "value": "p", "valueFrom": {"secretKeyRef": {"name": "s", "key": "p"}}},
                   {"name": "SEGPIPE_LOG_LEVEL", "value": "info"}]
    bad = _credential_env_by_value(cluster)
    assert [b.split("(")[1] for b in bad] == ["AWS_SECRET_ACCESS_KEY)", "HF_TOKEN)", "DB_PASSWORD)"]
    assert "spec.headGroupSpec.template.spec.containers[0].env[0]" in bad[0]
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"  # built here so this file holds no key-shaped string
    assert _leaks(f"aws_access_key_id = {key_id}") == [key_id]
    assert _leaks("[default]\nAWS_Secret_Access_Key: abc") == ["aws_secret_access_key:"]
    assert _leaks((INFRA / "README.md").read_text()) == []
