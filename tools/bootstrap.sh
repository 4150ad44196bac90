#!/usr/bin/env bash
# Everything a fresh machine needs: Fashion-MNIST from Debian (when missing), a Python 3.11 venv in .venv,
# and this package with its pinned dependencies (torch 2.14.1 + torchvision 0.29.1, timm, onnxruntime, ...),
# with the dev, postgres and autocast extras (pytest, ruff; psycopg for tests/test_postgres.py's PostgreSQL server;
# NVIDIA ModelOpt AutoCast, the FP16 conversion before a TensorRT build, which runs and is tested on the CPU).
# Safe to run again: every step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  echo "bootstrap: installing Debian's dataset-fashion-mnist" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# PostgreSQL for tests/test_postgres.py (a real server, started by the test); best effort: without it that test
# skips and says why
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  echo "bootstrap: installing Debian's postgresql (for the multi-worker search test)" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null; } \
    || echo "bootstrap: postgresql could not be installed; tests/test_postgres.py will skip" >&2
fi

# QEMU's user-mode emulator for tests/test_cpu_formats.py, which runs ONNX Runtime's integer kernels as an AVX2-only
# CPU (Zen 3) has them, whatever CPU this is; best effort: without it that test skips and says why
if ! command -v qemu-x86_64 >/dev/null 2>&1 && [ "$(uname -m)" = x86_64 ]; then
  echo "bootstrap: installing Debian's qemu-user (ONNX Runtime's AVX2 kernels under emulation, for the tests)" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-user >/dev/null; } \
    || echo "bootstrap: qemu-user could not be installed; the AVX2 emulation test will skip" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python=$(command -v python3.11 || command -v python3)
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "bootstrap: needs Python 3.11, found $("$python" --version)" >&2; exit 1; }
  "$python" -m venv .venv
fi

# Reinstall only when pyproject.toml changed since the last successful install (pip is slow to say "nothing to do").
stamp=.venv/.pomq-deploy-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import pomq_deploy' 2>/dev/null; then
  echo "bootstrap: installing pomq-deploy and its pinned dependencies into .venv (first time: a few minutes, ~6 GB with torch)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,postgres,autocast]" 2>&1 \
    | { grep -v -e "^WARNING: Location" -e "BuildBackendWarning" -e "^ " -e "^$" || true; } >&2
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bootstrap: pip install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
