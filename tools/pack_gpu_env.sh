#!/usr/bin/env bash
# Packs the Python packages a GPU device machine lacks (it has torch with CUDA 13 on Python 3.12, nvcc, no package
# registry) as one xz-compressed tar of a ready site folder, split into parts small enough to travel one per call.
#
# Usage, from the project root:  bash tools/pack_gpu_env.sh
# What it packs: the dependency closure of this project's requirements (pyproject.toml) and pytest, at the versions
# installed in .venv, less torch and everything torch brings (the device has its own), less wandb and scipy (the
# check logs nothing and converts no SVHN/ImageNet devkit); DALI as its CUDA 13 build (extra gpu-cu13) at .venv's
# DALI version, with the CUDA 13 codec libraries that build pins. DeepSpeed and antlr4 (sources only on PyPI) are
# built here as pure-Python wheels. Output: .gpuenv/part-NN (git-ignored) and the calls to make, printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=.gpuenv; part_mb=${PART_MB:-60}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpuenv/' "$exclude" 2>/dev/null || echo '/.gpuenv/' >> "$exclude"
rm -rf "$out" && mkdir -p "$out/w"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)

# name==version for the closure, read from .venv's installed metadata
"$PY" - > "$out/pins.txt" <<'PYEOF'
import re, tomllib
from importlib import metadata
from packaging.requirements import Requirement

def norm(name): return re.sub(r"[-_.]+", "-", name).lower()

installed = {norm(d.metadata["Name"]): d for d in metadata.distributions()}
target = {"python_version": "3.12", "platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64"}

def closure(names):
    seen, todo = {}, [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in seen or name not in installed:
            continue
        seen[name] = installed[name].version
        for spec in installed[name].requires or []:
            dep = Requirement(spec)
            if dep.marker is None or any(dep.marker.evaluate({**target, "extra": e}) for e in req.extras or [""]):
                todo.append(dep)
    return seen

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
left_out = {"wandb", "scipy"}
wanted = [r for r in project["dependencies"] + project["optional-dependencies"]["gpu-cu12"] + ["pytest"]
          if norm(Requirement(r).name) not in left_out]
device_has = closure(["torch"])
pins = {n: v for n, v in closure(wanted).items() if n not in device_has and not re.search(r"cu12|cuda120", n)}
dali = installed["nvidia-dali-cuda120"].version
print(f"nvidia-dali-cuda130=={dali}")
for name, version in sorted(pins.items()):
    print(f"{name}=={version}")
PYEOF
source_only='^(deepspeed|antlr4-python3-runtime)=='
grep -Ev "$source_only" "$out/pins.txt" | grep -v '^nvidia-dali-cuda130' > "$out/binary.txt"
# DALI with its own CUDA 13 dependencies, the rest held to .venv's versions; then every pinned wheel without deps
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -c "$out/binary.txt" -d "$out/w" "$(grep '^nvidia-dali-cuda130' "$out/pins.txt")"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$out/w" -r "$out/binary.txt"
grep -E "$source_only" "$out/pins.txt" | while read -r pin; do
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$out/w" "$pin"
done
# installed into one folder for Python 3.12, so the device only unpacks it (wheels are deflated, the unpacked
# libraries are not, and xz roughly halves them)
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --target "$out/site" "$out"/w/*.whl
cp "$out/pins.txt" "$out/site/AUGSSL_PINS.txt"
rm -rf "$out/w"
tar -C "$out" -cf - site | xz -3 -T2 | split -b "${part_mb}m" -d - "$out/part-"
rm -rf "$out/site"
n=$(ls "$out"/part-* | wc -l)
echo "$(du -sh "$out" | cut -f1) in $n parts ($(wc -l < "$out/pins.txt") packages). Calls to make, back to back"
echo "(the machine goes back 30 s after a call):"
parts=("$out"/part-*)
for p in "${parts[@]::${#parts[@]}-1}"; do
  echo "  run  command='mkdir -p /tmp/gw && cp $p /tmp/gw/'  carry=['$p']"
done
last=${parts[-1]}
echo "  run  command='mkdir -p /tmp/gw && cp $last /tmp/gw/ && bash tools/gpu_check.sh'  carry=['$last']  timeout_s=540"
