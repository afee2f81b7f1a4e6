#!/bin/bash
# The per-method table on the GPU machine (no Docker): `deploykit bench --methods ... --serve` on an
# 8B-shaped model with random weights, plus the start-up guard and the memory estimator's inputs.
# Run from the repository's root on the GPU machine, after ../shared/gpu's parts were carried to
# /tmp/parts and .gpu/s, .gpu/extra (matplotlib for bench's plot, orjson; uvloop, the bridge's
# event loop, comes with vLLM) beside the checkout:
#
#   bash benchmarks/gpu/methods_h200.sh setup     # vLLM 0.24.0 etc. (../shared/gpu/setup.sh), extras
#   bash benchmarks/gpu/methods_h200.sh models    # /tmp/m/{cfg,bf16,gptq,awq}: 8B shape, random
#   bash benchmarks/gpu/methods_h200.sh start     # facts, guard, plan; the bench in the background
#   bash benchmarks/gpu/methods_h200.sh collect   # copy what is there so far to $OUT
#
# The bench runs in the background (all five methods take longer than one call may) and writes to
# /tmp/res; `collect` copies it (and the processes' logs) to $OUT whenever asked.
set -u
RES=/tmp/res
M=/tmp/m
METHODS=${METHODS:-none,fp8,awq,gptq,bitsandbytes}
CONCURRENCY=${CONCURRENCY:-1,8,64,256}
MAX_TOKENS=${MAX_TOKENS:-128}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0
# Mosquitto from the carried Debian packages: its libraries for it alone, not for vLLM
mkdir -p /tmp/mqbin
for tool in usr/sbin/mosquitto usr/bin/mosquitto_passwd; do
  cat > /tmp/mqbin/$(basename $tool) <<EOF
#!/bin/sh
LD_LIBRARY_PATH=/tmp/mq/usr/lib/x86_64-linux-gnu:/tmp/mq/lib/x86_64-linux-gnu exec /tmp/mq/$tool "\$@"
EOF
  chmod +x /tmp/mqbin/$(basename $tool)
done
export PATH=/tmp/mqbin:$PATH
models="none=$M/bf16,fp8=$M/bf16,bitsandbytes=$M/bf16,awq=$M/awq,gptq=$M/gptq"

case "${1:-}" in
setup)
  bash .gpu/s/setup.sh || exit 1
  python3 -m pip install -q --no-index --find-links .gpu/extra matplotlib orjson 2>&1 | tail -3
  python3 -c "import matplotlib, orjson, uvloop, vllm; print('extras ok', matplotlib.__version__, vllm.__version__)"
  ;;
models)
  t0=$(date +%s)
  python3 templates/engine/cpu/make_demo_model.py $M/cfg --size llama3-8b --config-only || exit 1
  for layout in bf16 gptq awq; do
    [ -f $M/$layout/config.json ] || python3 benchmarks/gpu/random_checkpoint.py $M/cfg $M/$layout --layout $layout || exit 1
  done
  du -sh $M/*; df -h /tmp | tail -1
  echo "models: $(( $(date +%s) - t0 )) s"
  ;;
start)
  mkdir -p $RES
  nvidia-smi > $RES/nvidia-smi.txt 2>&1
  python3 -m deploykit gpus --json > $RES/gpus-h200.json 2> $RES/gpus.err
  python3 -c "import vllm, torch; from vllm.config import CacheConfig; print(vllm.__version__, torch.__version__, CacheConfig().gpu_memory_utilization)" > $RES/versions.txt 2>&1
  git log -1 --format=%H > $RES/commit.txt 2>/dev/null || true
  python3 benchmarks/gpu/guard_check.py --gpu-class cuda-fp8 --model "$models" > $RES/guard-h200.json 2> $RES/guard.err
  echo "guard exit $?"
  for q in none fp8 awq gptq bitsandbytes; do
    model=$(echo "$models" | tr ',' '\n' | grep "^$q=" | cut -d= -f2)
    python3 -m deploykit plan --model "$model" --quant $q --gpus 0 --json > $RES/plan-$q.json 2> $RES/plan-$q.err
  done
  cmd=(python3 -m deploykit bench --methods "$METHODS" --serve --model "$models"
       --concurrency "$CONCURRENCY" --max-tokens "$MAX_TOKENS" --overhead-requests 0
       --name h200 --out $RES/methods --timeout 900)
  echo "${cmd[*]}" > $RES/command.txt
  # its own session: the device tool ends the call's process group when the call returns
  setsid nohup "${cmd[@]}" > $RES/bench.out 2>&1 < /dev/null &
  echo "bench started: pid $!"
  ;;
collect)
  # one archive: the device tool brings back only a few files per call
  out=${OUT:-/tmp/out}
  mkdir -p $out
  tar -czf $out/res.tgz -C $RES . 2>/dev/null
  tail -5 $RES/bench.out 2>/dev/null
  ls $RES/methods 2>/dev/null
  ;;
*)
  echo "usage: $0 setup|models|start|collect" >&2; exit 2 ;;
esac
