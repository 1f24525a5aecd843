#!/usr/bin/env bash
# Packs what device_run.sh needs on the GPU machine (Python 3.12, PyTorch, no MuJoCo / Gymnasium /
# tensordict / SB3, no registry access): cp312 wheels unpacked and stripped of MuJoCo's viewer,
# studio and headers into .whl/site312.tar.xz (~7 MB: the device tool carries <= 64 MiB with the
# tracked tree, ~39 MB), and the EGL loader .debs into .gl/. Run once, here, from the repo root:
#   bash docs/measurements/h100-wrapper/prepare_device.sh
# then call the device tool with carry [".whl", ".gl"] and the command
#   bash docs/measurements/h100-wrapper/device_run.sh
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gl/\n' >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp/wheels" \
    gymnasium==1.4.0 mujoco==3.17.0 tensordict==0.14.3 pyvers==0.2.3 orjson farama-notifications \
    glfw PyOpenGL etils stable-baselines3 importlib_metadata importlib_resources
mkdir -p "$tmp/site"
for w in "$tmp"/wheels/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
rm -rf "$tmp"/site/mujoco/{experimental,include,viewer.py} "$tmp"/site/mujoco/_render_filament* \
    "$tmp"/site/mujoco/_simulate* "$tmp/site/bin"
find "$tmp/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .whl .gl
tar -cJf .whl/site312.tar.xz -C "$tmp/site" .
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
mkdir -p /tmp/amd64/partial
apt-get $o update > /dev/null
(cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
rm -rf "$tmp"
ls -la .whl .gl
