#!/usr/bin/env bash
# The bridge in front of vLLM on one GPU: MQTT against direct HTTP at concurrency 1/64/256/512,
# whole and streamed answers, the engine's own ceiling from `vllm bench serve`, and the bridge's CPU
# per request. Runs on the GPU machine after the vLLM 0.24 set-up of the GPU recipe (setup.sh:
# vLLM in the image's Python, Mosquitto unpacked to /tmp/mq), from the repository's root:
#
#   bash benchmarks/gpu/bridge_h200.sh bench   # the 120M random-weight Llama (fast: stresses the bridge)
#   bash benchmarks/gpu/bridge_h200.sh 8b      # Llama-3-8B's shape, random weights (GPU-bound)
#
# Results go to a folder packed as $OUT/h200-<model>.tgz (default OUT: benchmarks/results):
# bridge-<model>.json (bridge_throughput.py), vllm-bench-<model>-c<N>.json (vllm bench serve), and
# the logs. orjson (not in the GPU image) is expected in /tmp/extra (pip install --target); uvloop,
# the bridge's event loop, comes with vLLM (fastapi[standard] -> uvicorn[standard]).
#
# Environment: ROUNDS (requests per concurrent client, default 3), REPEAT (runs of each cell, paths
# alternating, default 1), STREAM_INTERVAL (the engine's --stream-interval, tokens per streamed
# event, default 1: vLLM's own default). The bridge asks for 4 tokens per event per request
# (engine_stream_tokens); vLLM releases before the per-request field ignore it, and only the
# server-wide flag has that effect there, on direct clients too. CONCURRENCY (default 1,64,256,512),
# MODES (default whole,stream), PAIRS (1-token overhead pairs at concurrency 1, default 20) and
# CEILING=0 (skip `vllm bench serve`) shorten a run when little GPU time is left. BRIDGES="a=TREE
# b=TREE" measures several bridges (source trees) in one run, each against the same direct path
# (bridge_throughput.py --bridge); default: this tree's.
set -uo pipefail
kind=${1:?usage: bridge_h200.sh bench|8b}
final=${OUT:-benchmarks/results}
OUT=/tmp/results-$kind
rm -rf "$OUT" && mkdir -p "$OUT" "$final"
trap 'tar -czf "$final/h200-$kind.tgz" -C "$OUT" .' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}:/tmp/extra
[ -f /tmp/dk_site ] && [ "$(cat /tmp/dk_site)" = /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
export LD_LIBRARY_PATH=/tmp/mq/usr/lib/x86_64-linux-gnu:/tmp/mq/lib/x86_64-linux-gnu
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
py=python3
model=/tmp/m-$kind
port=8000
case $kind in
  bench) make=(--size bench); serve=(--enforce-eager) ;;
  8b) make=(--size llama3-8b --config-only); serve=(--enforce-eager --load-format dummy --max-model-len 4096) ;;
  *) echo "unknown model $kind" >&2; exit 2 ;;
esac
[ -f "$model/config.json" ] || $py templates/engine/cpu/make_demo_model.py "$model" "${make[@]}" || exit 1

t0=$(date +%s)
$py -m vllm.entrypoints.cli.main serve "$model" --served-model-name bench --dtype bfloat16 \
  --host 127.0.0.1 --port $port --max-num-seqs 512 --disable-log-stats "${serve[@]}" \
  --stream-interval "${STREAM_INTERVAL:-1}" \
  >"$OUT/vllm-$kind.log" 2>&1 &
vllm=$!
# what was measured is packed before vLLM is stopped (its shutdown can outlast a lent machine's time)
trap 'tar -czf "$final/h200-$kind.tgz" -C "$OUT" .; kill $vllm 2>/dev/null; wait $vllm 2>/dev/null' EXIT
healthy() { $py -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; }
until healthy; do
  kill -0 $vllm 2>/dev/null || { echo "vLLM exited"; tail -30 "$OUT/vllm-$kind.log"; exit 1; }
  sleep 2
done
echo "vLLM ($kind) healthy after $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv >"$OUT/gpu-$kind.csv"

# The engine's ceiling: vLLM's own client, the same prompt and output lengths.
for c in $([ "${CEILING:-1}" = 0 ] || echo 64 256 512); do
  $py -m vllm.entrypoints.cli.main bench serve --backend openai-chat \
    --base-url http://127.0.0.1:$port --endpoint /v1/chat/completions --model bench \
    --tokenizer "$model" --dataset-name random --random-input-len 24 --random-output-len 128 \
    --ignore-eos --num-prompts $((${ROUNDS:-3} * c)) --max-concurrency $c \
    --save-result --result-dir "$OUT" --result-filename "vllm-bench-$kind-c$c.json" \
    >"$OUT/vllm-bench-$kind-c$c.log" 2>&1
  grep -E "Request throughput|Output token throughput|Failed requests" "$OUT/vllm-bench-$kind-c$c.log" | sed "s/^/vllm bench c=$c: /"
done

# MQTT against direct; the bridge and Mosquitto are started by the benchmark.
bridges=(); for b in ${BRIDGES:-}; do bridges+=(--bridge "$b"); done
$py benchmarks/bridge_throughput.py "${bridges[@]}" --engine http://127.0.0.1:$port \
  --mosquitto /tmp/mq/usr/sbin/mosquitto --concurrency "${CONCURRENCY:-1,64,256,512}" \
  --modes "${MODES:-whole,stream}" --max-tokens 128 --rounds "${ROUNDS:-3}" --repeat "${REPEAT:-1}" \
  --overhead-pairs "${PAIRS:-20}" --clients 8 --json "$OUT/bridge-$kind.json" \
  2>"$OUT/bridge-$kind.log"
echo "done in $(( $(date +%s) - t0 )) s"
