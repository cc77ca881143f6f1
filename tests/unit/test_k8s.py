"""The KubeRay manifests in k8s/: every overlay renders, and what it renders is deployable.

The overlays are rendered by the real ``kubectl kustomize`` (installed by
``scripts/install-test-tools.sh``), so the tests check what ``kubectl apply -k`` creates.

Pod templates are checked against the Kubernetes API schema by deserialising them into
the official client's models (unknown or mistyped fields fail), and each entrypoint and
config is checked against rayalign itself.
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ["cpu-demo", "gpu"]


def kustomize(overlay: str) -> list[dict]:
    """The objects ``kubectl kustomize k8s/overlays/<overlay>`` renders: what ``kubectl apply -k`` creates."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed: run `bash scripts/install-test-tools.sh` (Debian's kubernetes-client)")
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"`kubectl kustomize k8s/overlays/{overlay}` failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every Ray group in a RayCluster, RayJob or RayService."""
    spec = obj.get("spec", {})
    out = []
    for cluster in (spec if obj["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")):
        if cluster:
            out.append((f"{obj['kind']}/{obj['metadata']['name']} head", cluster["headGroupSpec"]["template"]))
            out += [
                (f"{obj['kind']}/{obj['metadata']['name']} {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])
            ]
    return out


def containers(objects: list[dict]) -> list[dict]:
    return [c for obj in objects for _, template in pod_templates(obj) for c in template["spec"]["containers"]]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, kustomize(request.param)


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def test_every_manifest_parses():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 9
    for path in files:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents, path


def test_overlays_hold_the_whole_deployment(rendered):
    _, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"]
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "rayalign"
    cluster = by_kind(objects, "RayCluster")[0]["spec"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["gpu", "cpu"]


def test_pod_templates_match_the_kubernetes_schema(rendered):
    from kubernetes.client import ApiClient, V1PodTemplateSpec

    client = ApiClient()
    _, objects = rendered
    templates = [t for obj in objects for t in pod_templates(obj)]
    assert len(templates) == 3 + 3 + 2  # RayCluster, RayJob: head + 2 groups; RayService: head + gpu
    for where, template in templates:
        model = client._ApiClient__deserialize(template, V1PodTemplateSpec)
        # A field the schema does not know is dropped by the client: compare both ways.
        assert client.sanitize_for_serialization(model) == template, where
        assert model.spec.containers and model.spec.security_context.run_as_non_root, where


def test_containers_are_bounded_unprivileged_and_pinned(rendered):
    _, objects = rendered
    for container in containers(objects):
        resources = container["resources"]
        for kind in ("cpu", "memory"):
            assert resources["requests"][kind] == resources["limits"][kind], (container["name"], kind)
        assert resources["requests"].get("nvidia.com/gpu") == resources["limits"].get("nvidia.com/gpu")
        security = container["securityContext"]
        assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        image = container["image"]
        assert re.fullmatch(r"[\w./-]+(@sha256:[0-9a-f]{64}|:[\w.-]+)", image) and not image.endswith(":latest"), image
    for _, template in (t for obj in objects for t in pod_templates(obj)):
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert template["spec"]["securityContext"]["runAsUser"] != 0


def test_gpu_overlay_gives_gpus_and_cpu_demo_none():
    gpu = containers(kustomize("gpu"))
    cpu = containers(kustomize("cpu-demo"))
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") == "1" for c in gpu)
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in cpu)
    assert all(c["image"].endswith("-gpu") for c in gpu)


def test_rayjob_runs_a_real_rayalign_command_on_its_configmap(rendered):
    from jobs.cli import build_parser
    from orchestrator.config import load_config, load_preset, preset_names
    from orchestrator.pools import check_fits, demands

    name, objects = rendered
    job = by_kind(objects, "RayJob")[0]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "rayalign"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and Path(args.output_dir).is_absolute()
    # A retried or re-applied job continues the run (or starts it): one fixed entrypoint works every time.
    assert args.resume and job["backoffLimit"] > 0
    if args.preset:
        assert args.preset in preset_names()
        cfg = load_preset(args.preset, args.overrides)
    else:
        # The config file is the ConfigMap, mounted on the head where the job's driver runs.
        head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mount = next(m for m in head["containers"][0]["volumeMounts"] if Path(args.config).parent == Path(m["mountPath"]))
        volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
        config_map = next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == volume["configMap"]["name"])
        cfg = load_config(yaml.safe_load(config_map["data"][Path(args.config).name]), args.overrides)
    # Checkpoints go to the runs claim, which every pod mounts.
    claim = by_kind(objects, "PersistentVolumeClaim")[0]["metadata"]["name"]
    for _, template in pod_templates(by_kind(objects, "RayJob")[0]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        assert any(
            Path(args.output_dir).is_relative_to(m["mountPath"])
            and volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim
            for m in mounts
        )
    # The config's pools fit in the job's cluster (head has no Ray CPUs; GPUs from limits).
    spec = job["rayClusterSpec"]
    cpus = gpus = 0.0
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus += group["replicas"] * float(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        gpus += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
    check_fits(demands(pools=cfg.pools, learner=cfg.learner, uses_reference=cfg.pools.reference.num_actors > 0), {"CPU": cpus, "GPU": gpus})
    if name == "gpu":
        assert cfg.learner.num_gpus_per_worker >= 1 and cfg.pools.rollout.num_gpus >= 1


def test_rayservice_serves_the_rayalign_app(rendered):
    from jobs.serve.app import DEPLOYMENT_NAME, IMPORT_PATH
    from orchestrator.config import ServeConfig, load_config

    _, objects = rendered
    service = by_kind(objects, "RayService")[0]["spec"]
    serve_config = yaml.safe_load(service["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == IMPORT_PATH
    cfg = load_config(app["args"], cls=ServeConfig)  # the args are a valid ServeConfig
    (deployment,) = app["deployments"]
    assert deployment["name"] == DEPLOYMENT_NAME and Path(deployment["user_config"]["lora"]).is_absolute()
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for _, t in pod_templates(by_kind(objects, "RayService")[0])
        for c in t["spec"]["containers"]
    ]
    assert (cfg.scaling.num_gpus_per_replica > 0) == any(gpu_limits)
