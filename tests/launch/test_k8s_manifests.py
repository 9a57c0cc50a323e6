"""Every manifest in k8s/, as kustomize renders it, validated offline: built-in kinds against the Kubernetes API
schemas (kubernetes-validate, strict: unknown fields are errors) for the oldest and the newest Kubernetes the
manifests are written for, PyTorchJob against k8s/schemas/ (whose pod templates are checked against the same
Kubernetes schemas), plus the cross-field rules no schema can express (GPUs = processes per pod, completions = nodes,
the Service name = the pods' subdomain, ...). Each kustomize component is also rendered on every base it applies to.

Needs kubectl (its built-in kustomize; on the development machines and CI) and the kubernetes-validate package.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.helpers.k8s_tools import (
    K8S,
    K8S_VERSIONS,
    PYTORCHJOB_SCHEMA,
    REPO,
    by_kind,
    components,
    config_maps,
    dump,
    kustomizations,
    kustomize,
    relative,
    require_k8s_tools,
    validation_errors,
)

require_k8s_tools()

KUSTOMIZATIONS = kustomizations()
COMPONENTS = components()
# what each component may be combined with (sizing components are used by the variant components)
COMPONENT_BASES = {"elastic": ["pytorchjob"]}
DEFAULT_BASES = ["pytorchjob", "indexed-job"]


def _id(path: Path) -> str:
    return str(path.relative_to(K8S))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {_id(path): kustomize(path) for path in KUSTOMIZATIONS}


def test_the_expected_kustomizations_exist():
    names = {_id(p) for p in KUSTOMIZATIONS}
    assert {"pytorchjob", "indexed-job", "make-shards", "storage", "overlays/imagenet-aasae",
            "overlays/indexed-imagenet-aasae", "overlays/imagenet-aag", "overlays/stl10-aasae", "overlays/stl10-aag",
            "overlays/cifar10-aag", "overlays/imagenet-aasae-elastic"} <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=_id)
def test_kustomization_output_is_valid(rendered, path, version):
    resources = rendered[_id(path)]
    assert resources
    problems = {f"{r['kind']}/{r['metadata']['name']}": validation_errors(r, version) for r in resources}
    assert not {k: v for k, v in problems.items() if v}, problems
    check_semantics(resources)


COMBINATIONS = [(c, b) for c in COMPONENTS if c.name != "image"  # image: already in every base
                for b in COMPONENT_BASES.get(c.name, DEFAULT_BASES)]


@pytest.mark.parametrize("component, base", COMBINATIONS, ids=[f"{c.name}+{b}" for c, b in COMBINATIONS])
def test_component_on_each_base(tmp_path, component, base):
    """A component (a variant, elastic, S3 shards, W&B online, sizing) applied to each job kind it is meant for."""
    dump(tmp_path / "kustomization.yaml", {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "nameSuffix": "-t",
        "resources": [relative(K8S / base, tmp_path)], "components": [relative(component, tmp_path)]})
    resources = kustomize(tmp_path)
    for version in K8S_VERSIONS:
        problems = {f"{r['kind']}/{r['metadata']['name']}": validation_errors(r, version) for r in resources}
        assert not {k: v for k, v in problems.items() if v}, problems
    check_semantics(resources)


# --------------------------------------------------------------------------------------------- cross-field rules


def _gpus(container: dict) -> int:
    limits = container["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def _pod_checks(pod: dict, what: str) -> None:
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, what
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], what
        assert sc["readOnlyRootFilesystem"] is True, what
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{what}: read-only root filesystem needs a writable /tmp"
        res = c["resources"]
        assert set(res) == {"requests", "limits"}, what
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), what
        assert c["image"].startswith("ghcr.io/augssl/augssl:"), f"{what}: the image setting did not reach {c['name']}"
        assert c.get("workingDir") == "/opt/augssl", what
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{what}: mount of an undefined volume {m['name']}"


def _training_pod_checks(pod: dict, env_names: set[str], what: str) -> None:
    _pod_checks(pod, what)
    c = pod["spec"]["containers"][0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", f"{what}: /dev/shm not memory-backed"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 60
    assert c["command"] == ["augssl-entrypoint"], what
    # every $(VAR) in the args and env values is defined (a typo would reach the trainer as a literal)
    defined = set(env_names) | {e["name"] for e in c.get("env", [])}
    used = set()
    for text in c.get("args", []) + [e.get("value", "") for e in c.get("env", [])]:
        used |= set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text))
    missing = used - defined - {"JOB_COMPLETION_INDEX"}  # set by the Job controller
    assert not missing, f"{what}: $(…) of undefined variables {missing}"
    secrets = [e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert {s["name"] for s in secrets} <= {"augssl-wandb", "augssl-s3"}
    assert any(s["name"] == "augssl-wandb" and s["key"] == "WANDB_API_KEY" for s in secrets), what
    assert "WANDB_API_KEY" not in env_names, f"{what}: a credential in a ConfigMap"


def _config_env(resources: list[dict], container: dict) -> dict[str, str]:
    maps = config_maps(resources)
    env = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"envFrom names ConfigMap {name}, which is not in the build"
        env.update(maps[name])
    return env


def _experiment_composes(env: dict[str, str]) -> None:
    if "EXPERIMENT" not in env:
        return
    assert (REPO / "configs" / "experiment" / f"{env['EXPERIMENT']}.yaml").exists(), env["EXPERIMENT"]
    assert env.get("AUGSSL_LOGGER") in {"wandb_offline", "wandb_online", "none"}


def check_semantics(resources: list[dict]) -> None:
    for job in by_kind(resources, "PyTorchJob"):
        spec, name = job["spec"], job["metadata"]["name"]
        replicas = spec["pytorchReplicaSpecs"]
        elastic = spec.get("elasticPolicy")
        nproc = int(elastic["nProcPerNode"]) if elastic and "nProcPerNode" in elastic else int(spec["nprocPerNode"])
        for rtype, r in replicas.items():
            pod = r["template"]
            c = pod["spec"]["containers"][0]
            env = _config_env(resources, c)
            _training_pod_checks(pod, set(env), f"{name}/{rtype}")
            _experiment_composes(env)
            assert _gpus(c) == nproc, f"{name}/{rtype}: {_gpus(c)} GPUs but {nproc} processes per pod"
            assert r["restartPolicy"] in ("OnFailure", "ExitCode")
            assert any(p["name"] == "pytorchjob-port" for p in c["ports"]), f"{name}/{rtype}: no pytorchjob-port"
            assert int(env["AUGSSL_SHUTDOWN_TIMEOUT"]) < pod["spec"]["terminationGracePeriodSeconds"]
            assert c["args"][0] == "torchrun" and "pipeline.train" in c["args"]
        assert spec["runPolicy"]["backoffLimit"] > 0
        if elastic:
            assert "Master" not in replicas
            assert elastic["minReplicas"] >= 1
            assert elastic["minReplicas"] <= replicas["Worker"]["replicas"] <= elastic["maxReplicas"]
        else:
            assert replicas["Master"]["replicas"] == 1
    for job in by_kind(resources, "Job"):
        spec, name = job["spec"], job["metadata"]["name"]
        pod = spec["template"]
        c = pod["spec"]["containers"][0]
        env = _config_env(resources, c)
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"], name
        assert pod["spec"]["restartPolicy"] == "Never" and spec.get("podReplacementPolicy") == "Failed", name
        if pod["metadata"]["labels"]["app.kubernetes.io/component"] == "make-shards":
            _pod_checks(pod, name)
            assert spec["completions"] == len(env["SHARDS_SPLITS"].split()), f"{name}: one pod per split"
            continue
        _training_pod_checks(pod, set(env), name)
        _experiment_composes(env)
        values = {e["name"]: e.get("value") for e in c["env"]}
        assert int(values["NNODES"]) == spec["completions"], f"{name}: NNODES != completions"
        assert int(values["NPROC_PER_NODE"]) == _gpus(c), f"{name}: NPROC_PER_NODE != GPUs"
        assert values["MASTER_ADDR"] == "$(JOB_NAME)-0.$(JOB_NAME)"
        services = by_kind(resources, "Service")
        assert len(services) == 1, name
        svc = services[0]
        # the pods are <job>-<index>.<subdomain>; MASTER_ADDR assumes Service name = Job name = subdomain
        assert svc["metadata"]["name"] == name == pod["spec"]["subdomain"]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        labels = pod["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service selects no pod"
        port = svc["spec"]["ports"][0]
        assert port["port"] == int(values["MASTER_PORT"])
        assert any(p["name"] == port["targetPort"] for p in c["ports"])
        exit_rules = [r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
        assert all(r["onExitCodes"]["containerName"] == c["name"] for r in exit_rules)


def test_variants_differ_only_where_they_should(rendered):
    """The overlays are variants of one job, not copies: apart from names, labels, sizing and the ConfigMap, the
    rendered pod templates are identical."""
    def normalized(resources):
        job = by_kind(resources, "PyTorchJob")[0]
        pod = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
        c = pod["spec"]["containers"][0]
        c.pop("resources")
        c["envFrom"] = []
        return pod
    base = normalized(rendered["overlays/imagenet-aasae"])
    for variant in ("imagenet-aag", "stl10-aasae", "stl10-aag", "cifar10-aag"):
        assert normalized(rendered[f"overlays/{variant}"]) == base, variant
    experiments = {v: config_maps(rendered[f"overlays/{v}"]) for v in
                   ("imagenet-aasae", "imagenet-aag", "stl10-aasae", "stl10-aag", "cifar10-aag")}
    assert {v: next(iter(m.values()))["EXPERIMENT"] for v, m in experiments.items()} == {
        "imagenet-aasae": "imagenet_aasae", "imagenet-aag": "imagenet_aag", "stl10-aasae": "stl10_aasae",
        "stl10-aag": "stl10_aag", "cifar10-aag": "cifar10_aag"}


def test_experiment_presets_compose_with_the_manifest_overrides(rendered):
    """What a pod passes to pipeline.train (experiment, run_dir, data.root, logger) composes for every variant."""
    from pipeline.config.compose import load

    for key, resources in rendered.items():
        for cm in by_kind(resources, "ConfigMap"):
            env = cm.get("data", {})
            if "EXPERIMENT" not in env:
                continue
            cfg = load("train", [f"experiment={env['EXPERIMENT']}", "run_dir=/runs/x",
                                 f"data.root={env['AUGSSL_DATA_ROOT']}", f"logger={env['AUGSSL_LOGGER']}"])
            assert cfg.experiment_name == env["EXPERIMENT"], key
            assert cfg.data.root == env["AUGSSL_DATA_ROOT"], key


# ------------------------------------------------------------------------------------- the validator is not blind


def _imagenet_job(rendered) -> dict:
    return copy.deepcopy(by_kind(rendered["overlays/imagenet-aasae"], "PyTorchJob")[0])


@pytest.mark.parametrize("breakage, message", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "Master"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]), "Chief"),
    (lambda j: j["spec"]["runPolicy"].update(cleanPodPolicy="Sometimes"), "cleanPodPolicy"),
    (lambda j: j["spec"]["runPolicy"].update(backofLimit=3), "backofLimit"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"), "restartPolicy"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(
        name="trainer"), "pytorch"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"].update(
        limit={"cpu": "1"}), "limit"),  # a typo inside the pod template: caught by the Kubernetes pod schema
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"].update(restartPolicy=7), "7"),
    (lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 8, "rdzvBackend": "c10d"}), "nprocPerNode"),
    (lambda j: j["spec"].update(elasticPolicy={"rdzvBackend": "zookeeper"}), "zookeeper"),
    (lambda j: j["metadata"].update(name="Augssl_Job"), "Augssl_Job"),
])
def test_pytorchjob_schema_rejects_mistakes(rendered, breakage, message):
    job = _imagenet_job(rendered)
    assert validation_errors(job, K8S_VERSIONS[-1]) == []
    breakage(job)
    errors = validation_errors(job, K8S_VERSIONS[-1])
    assert errors, f"not rejected: {message}"


def test_builtin_schemas_reject_mistakes(rendered):
    job = copy.deepcopy(by_kind(rendered["overlays/indexed-imagenet-aasae"], "Job")[0])
    for version in K8S_VERSIONS:
        assert validation_errors(job, version) == []
    job["spec"]["completionsMode"] = "Indexed"
    assert validation_errors(job, K8S_VERSIONS[-1])
    svc = copy.deepcopy(by_kind(rendered["overlays/indexed-imagenet-aasae"], "Service")[0])
    svc["spec"]["ports"][0]["port"] = "29500"
    assert validation_errors(svc, K8S_VERSIONS[-1])


def test_pytorchjob_schema_file_is_authored_and_says_so():
    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    assert "Authored for this project" in schema["$comment"]
    assert schema["properties"]["apiVersion"] == {"const": "kubeflow.org/v1"}


def test_dockerfile_matches_the_manifests(rendered):
    """The image the manifests run: the working directory, the user, the entrypoint they name, the files copied."""
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /opt/augssl$", text, re.M)
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert "COPY docker/entrypoint.sh /usr/local/bin/augssl-entrypoint" in text
    assert re.search(r'^ENTRYPOINT \["augssl-entrypoint"\]$', text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in shlex.split(line)[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    pod = by_kind(rendered["overlays/imagenet-aasae"], "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"]["Master"]
    assert pod["template"]["spec"]["securityContext"]["runAsUser"] == 1000
    image = yaml.safe_load((K8S / "components" / "image" / "kustomization.yaml").read_text())["images"][0]
    assert image["name"] == "augssl"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
