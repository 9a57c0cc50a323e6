"""Helpers for the Kubernetes tests: render kustomizations with kubectl's built-in kustomize, validate resources
offline against the Kubernetes API schemas (the kubernetes-validate package) and the PyTorchJob schema in
k8s/schemas/, and turn a rendered pod template into the process a kubelet would start.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

K8S = REPO / "k8s"
PYTORCHJOB_SCHEMA = K8S / "schemas" / "pytorchjob-kubeflow.org-v1.json"
# the oldest Kubernetes the manifests are written for (Indexed Job podReplacementPolicy, backoffLimitPerIndex) and
# the version of the kubectl on the development machines
K8S_VERSIONS = ("1.29", "1.32")


def kubectl() -> str | None:
    return shutil.which("kubectl")


def kustomize(path: Path) -> list[dict]:
    """`kubectl kustomize PATH` as a list of resources."""
    out = subprocess.run([kubectl() or "kubectl", "kustomize", str(path)], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def kustomizations() -> list[Path]:
    """Every directory under k8s/ holding a Kustomization (not a Component): each one is something to apply."""
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


def components() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml")
                  if yaml.safe_load(p.read_text()).get("kind") == "Component")


# ------------------------------------------------------------------------------------------------------ schemas


@lru_cache(maxsize=None)
def _k8s_definitions(version: str) -> dict:
    import importlib.resources

    import kubernetes_validate.utils as kvu

    real = [v for v in kvu.all_versions() if kvu.major_minor(v) <= version][-1]
    ref = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{real}-local-strict" \
        / "_definitions.json"
    return json.loads(ref.read_text())


@lru_cache(maxsize=None)
def _pytorchjob_validator(version: str):
    import jsonschema
    from referencing import Registry, Resource

    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    registry = Registry().with_resources([
        ("https://kubernetes.io/api/_definitions.json", Resource.from_contents(_k8s_definitions(version))),
        (schema["$id"], Resource.from_contents(schema)),
    ])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validation_errors(resource: dict, version: str) -> list[str]:
    """Schema violations of one resource against Kubernetes `version` (strict: unknown fields are errors);
    [] when valid."""
    if resource.get("apiVersion") == "kubeflow.org/v1" and resource.get("kind") == "PyTorchJob":
        validator = _pytorchjob_validator(version)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
                for e in validator.iter_errors(resource)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'/'.join(map(str, err.absolute_path))}: {err.message[:300]}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [err.message]
    return []


# ------------------------------------------------------------------------------------------ what a kubelet does


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, anything else stays as written."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def _quantity_to_cores(value: str) -> int:
    value = str(value)
    cores = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
    return max(1, math.ceil(cores))


def container_env(container: dict, *, config_maps: dict[str, dict], secrets: dict[str, dict], labels: dict,
                  annotations: dict, injected: list[tuple[str, str]] = ()) -> dict[str, str]:
    """The environment a kubelet gives `container`: envFrom first, then env in order (each value expanded with the
    variables defined before it), then what a controller appended to env (`injected`)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind = "configMapRef" if "configMapRef" in source else "secretRef"
        ref = source[kind]
        data = (config_maps if kind == "configMapRef" else secrets).get(ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise KeyError(f"envFrom {kind} {ref['name']} does not exist (the pod would not start)")
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for item in list(container.get("env", [])) + [{"name": k, "value": v} for k, v in injected]:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
            if not m:
                raise ValueError(f"fieldRef {path} is not simulated")
            table = labels if m.group(1) == "labels" else annotations
            if m.group(2) not in table:
                raise KeyError(f"{name}: the pod has no {m.group(1)[:-1]} {m.group(2)}")
            env[name] = table[m.group(2)]
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
            ref = source[kind]
            data = (secrets if kind == "secretKeyRef" else config_maps).get(ref["name"], {})
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise KeyError(f"{name}: {kind} {ref['name']}/{ref['key']} does not exist (the pod would not start)")
        elif "resourceFieldRef" in source:
            resource = source["resourceFieldRef"]["resource"]
            kind, _, what = resource.partition(".")
            value = container.get("resources", {}).get(kind, {}).get(what)
            if value is None:
                raise KeyError(f"{name}: the container has no {resource}")
            env[name] = str(_quantity_to_cores(value)) if what == "cpu" else str(value)
        else:
            raise ValueError(f"env {name}: source {source} is not simulated")
    return env


def container_argv(container: dict, env: dict[str, str]) -> list[str]:
    return [expand(a, env) for a in container.get("command", []) + container.get("args", [])]


def by_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r.get("kind") == kind]


def config_maps(resources: list[dict]) -> dict[str, dict]:
    return {r["metadata"]["name"]: r.get("data", {}) for r in by_kind(resources, "ConfigMap")}


def dump(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def relative(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def require_k8s_tools() -> None:
    """Module-level guard: under CI both tools must be there; elsewhere the module is skipped with the reason."""
    try:
        import kubernetes_validate  # noqa: F401  (the Kubernetes API schemas)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("kubernetes-validate is not installed (a test dependency: pyproject [test])",
                    allow_module_level=True)
    if kubectl() is None:
        if os.environ.get("CI"):
            raise RuntimeError("kubectl (with its built-in kustomize) is required by the Kubernetes tests under CI")
        pytest.skip("kubectl not installed (its built-in kustomize renders the manifests)", allow_module_level=True)
