#!/usr/bin/env bash
# Every speed benchmark in one run, each next to its peer measured in the same run, collected
# into one JSON file: the first thing to run on a GPU machine.
#
#   scripts/bench.sh [--device auto|cpu|cuda] [--quick | --smoke] [--flower] [--out DIR]
#
#   train step   `site-agent bench train` (unet, 47 classes) vs PyTorch eager
#                (model/tests/reference/torch_reference.py), same batch, patch and precision
#   predict      sliding-window predict (`bench_predict`) vs PyTorch's (`bench_predict_torch.py`),
#                same tiles; also vs PyTorch with the network channels-last, as ours runs on the CPU
#   data path    preprocessing cache + loader + augmentation (`bench_data`) vs nnU-Net v1's CPU
#                augmentation (batchgenerators with nnUNetTrainerV2's transforms and probabilities,
#                `scripts/bench_data_nnunet.py`) on the same cases, patch and thread count
#   architecture FIRENet vs U-Net training step (`bench_arch`)
#   transfer     QUIC vs TCP model transfer to 3 sites and back (`bench_transfer`)
#   transfer_wan the same QUIC transfer through the link emulator at issue 18's WAN conditions,
#                with the chosen congestion controller (`bench_transfer --wan`): goodput as a
#                fraction of each site's link rate
#   round        a whole `coordinator simulate` of 3 tiny sites, 2 rounds of 1 step: round overhead
#   round_flower (--flower) a whole deployed round like for like (`scripts/bench_round.py`): the
#                coordinator + 3 `site-agent` processes with the unet model (~117 MB) and no local
#                training vs Flower (SuperLink + 3 SuperNodes, FedAvg over one float32 array of
#                the same size, clients echo it): round wall time and peak RSS of all processes.
#                Installs flwr from PyPI into the venv (only with --flower).
# --quick: CPU-sized shapes (minutes on 2 cores); without it the shapes are the paper's (for a
# GPU: sized for under 8 minutes on one). Writes DIR/bench.json (default bench-out/) and prints
# each figure with its peer's and the ratio (peer time / ours: > 1 means we are faster).
# --smoke: the test of this script, run by scripts/test.sh (so by CI) after `cargo test`: every
# benchmark above but round_flower, and every peer, once at the smallest shapes that still run
# their code (CPU unless --device says otherwise), with the dev-profile binaries and examples
# that `cargo test` has already built (no release build). Its figures are not performance
# figures: bench.json says "smoke": true. Exits non-zero when a benchmark or its peer produced
# no figure (no speed thresholds). About 2 minutes on 2 cores.
# BENCH_PROFILE=dev|release: which build runs (default: dev with --smoke, release otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="" QUICK=0 SMOKE=0 FLOWER=0 OUT="$PWD/bench-out"
usage="usage: scripts/bench.sh [--device auto|cpu|cuda] [--quick | --smoke] [--flower] [--out DIR]"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    --flower) FLOWER=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
if [ $SMOKE = 1 ] && [ $FLOWER = 1 ]; then
  echo "bench: --flower is not part of the smoke (it installs flwr from PyPI)" >&2; exit 2
fi
[ -n "$DEVICE" ] || DEVICE=$([ $SMOKE = 1 ] && echo cpu || echo auto)
PROFILE=${BENCH_PROFILE:-$([ $SMOKE = 1 ] && echo dev || echo release)}
case "$PROFILE" in
  dev | debug) PROFILE=dev BIN="$PWD/target/debug" ;;
  release) BIN="$PWD/target/release" ;;
  *) echo "bench: BENCH_PROFILE=$PROFILE: dev or release" >&2; exit 2 ;;
esac
START=$(date +%s)
scripts/setup.sh >/dev/null
. scripts/env.sh
PY="$VIRTUAL_ENV/bin/python"
if [ "$DEVICE" = auto ]; then
  DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
SHAPES=$([ $SMOKE = 1 ] && echo "smoke (not performance figures)" || { [ $QUICK = 1 ] && echo quick || echo full; })
echo "bench: device $DEVICE, $SHAPES shapes; building ($PROFILE)"
if [ $PROFILE = release ]; then
  cargo build --release --quiet --bins
  cargo build --release --quiet -p fedtalent-model --example bench_predict --example bench_arch
  cargo build --release --quiet -p fedtalent-data --example bench_data
  cargo build --release --quiet -p fedtalent-protocol --example bench_transfer
else
  # The whole workspace's binaries and examples at once, as `cargo test --workspace` builds them
  # (same features, same CARGO_INCREMENTAL as scripts/test.sh): after it, nothing to build. A
  # `-p` build of one example would resolve other features and rebuild dependencies (minutes).
  CARGO_INCREMENTAL=0 cargo build --quiet --workspace --bins --examples
fi
rm -rf "$OUT"
mkdir -p "$OUT"

ROUND=(--cases 3)
if [ $SMOKE = 1 ]; then
  # The smallest that runs: one step and no warm-up; the unet's bottleneck needs more than one
  # voxel (instance norm); the tiny preset's tile is 16x48x48; the WAN sweep's 3 conditions, each
  # with 5 MB; phantom sites of 2 cases (one to train, one to validate), no post-processing step.
  PATCH=(16 64 64) BATCHES=(2) STEPS=1 WARMUP=0 PRECISIONS=(fp32)
  PREDICT=(--preset tiny --classes 3 --shape 32 96 96)
  DATA=(--threads 2 --batches 2 --cases 1 --patch 32 64 64) DATA_PEER=(--threads 2 --batches 2 --patch 32 64 64)
  ARCH=(--patch 16,64,64 --steps 1 --warmup 0) MB=5
  ROUND=(--cases 2 --shape 32 64 64 --postprocess false)
elif [ $QUICK = 1 ]; then
  PATCH=(32 64 64) BATCHES=(2) STEPS=3 WARMUP=1 PRECISIONS=(fp32)
  # 12 batches: well past the peer's queue (num_cached_per_thread 2 per worker), which a short
  # run would time instead of its workers (4 batches once read 5.9 samples/s, 0.65 the run before).
  PREDICT=(--preset tiny --classes 3 --shape 48 128 128) DATA=(--threads 2 --batches 12 --cases 2)
  DATA_PEER=(--threads 2 --batches 12)
  ARCH=(--patch 32,64,64 --steps 2 --warmup 1) MB=30
else
  PATCH=(96 192 192) BATCHES=(2 4) STEPS=20 WARMUP=5 PRECISIONS=(fp32)
  [ "$DEVICE" = cuda ] && PRECISIONS=(fp16 fp32)
  PREDICT=(--preset unet --classes 47 --shape 200 512 512) DATA=(--threads 4 --batches 20 --cases 3)
  DATA_PEER=(--threads 4 --batches 20)
  ARCH=(--patch 96,192,192 --steps 10 --warmup 3) MB=120
fi

run() { # name, command...: one JSON line from the command's stdout into $OUT/name.json
  local name=$1 t
  shift
  t=$(date +%s)
  if "$@" > "$OUT/$name.out" 2>> "$OUT/log.txt"; then
    grep '^{' "$OUT/$name.out" > "$OUT/$name.json" || true
    echo "   $name: $(( $(date +%s) - t )) s"
  else
    echo "   $name: FAILED (see $OUT/log.txt)"; echo '{"error": "failed"}' > "$OUT/$name.json"
  fi
}

for batch in "${BATCHES[@]}"; do
  for precision in "${PRECISIONS[@]}"; do
    tag="b${batch}_${precision}"
    run "train_ours_$tag" "$BIN/site-agent" bench train --preset unet --classes 47 --batch "$batch" \
      --patch "${PATCH[@]}" --steps "$STEPS" --warmup "$WARMUP" --device "$DEVICE" --precision "$precision"
    run "train_torch_$tag" env CUDA_VISIBLE_DEVICES="$([ "$DEVICE" = cpu ] && echo "" || echo "${CUDA_VISIBLE_DEVICES-0}")" \
      "$PY" model/tests/reference/torch_reference.py --classes 47 --batch "$batch" --patch "${PATCH[@]}" \
      --steps "$STEPS" --warmup "$WARMUP" --dtype "$precision"
  done
done
run predict_ours "$BIN/examples/bench_predict" "${PREDICT[@]}" --device "$DEVICE"
# The peer tiles with our patch (the preset's, as our JSON reports it), so both run the same tiles.
OUR_PATCH=$("$PY" -c 'import json, sys; print(*json.load(open(sys.argv[1]))["patch"])' "$OUT/predict_ours.json" 2>/dev/null || true)
run predict_torch "$PY" model/examples/bench_predict_torch.py "${PREDICT[@]}" --device "$DEVICE" ${OUR_PATCH:+--patch $OUR_PATCH}
# Ours runs channels-last on the CPU by default; the peer the same way, for reference.
run predict_torch_cl "$PY" model/examples/bench_predict_torch.py "${PREDICT[@]}" --device "$DEVICE" \
  ${OUR_PATCH:+--patch $OUR_PATCH} --channels-last
# The data path, then nnU-Net's on the very cases ours preprocessed.
run data "$BIN/examples/bench_data" --device "$DEVICE" "${DATA[@]}" --keep "$OUT/data-cases"
run data_nnunet "$PY" scripts/bench_data_nnunet.py --cache "$OUT/data-cases/cache" "${DATA_PEER[@]}"
rm -rf "$OUT/data-cases"
run arch "$BIN/examples/bench_arch" --presets firenet,unet --device "$DEVICE" "${ARCH[@]}"
run transfer "$BIN/examples/bench_transfer" --mb "$MB"
run transfer_wan "$BIN/examples/bench_transfer" --wan --mb "$MB" --cc rate-window
t=$(date +%s)
if "$BIN/coordinator" simulate --out "$OUT/simulate" --preset tiny --rounds 2 --local-steps 1 "${ROUND[@]}" \
  --device "$DEVICE" > /dev/null 2>> "$OUT/log.txt"; then
  echo "{\"rounds\": 2, \"local_steps\": 1, \"sites\": 3, \"args\": \"${ROUND[*]}\", \"wall_s\": $(( $(date +%s) - t ))}" > "$OUT/round.json"
  echo "   round: $(( $(date +%s) - t )) s"
else
  echo '{"error": "failed"}' > "$OUT/round.json"
  echo "   round: FAILED (see $OUT/log.txt)"
fi
if [ $FLOWER = 1 ]; then
  # Ours first: Flower's array gets the byte count our sites downloaded.
  run round_ours "$PY" scripts/bench_round.py fedtalent --bin "$BIN" --rounds 4 --work "$OUT/round-work"
  floats=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["model_bytes_down_per_site"] // 4)' \
    "$OUT/round_ours.json" 2>/dev/null || echo 29300000)
  if "$PY" -c "import flwr" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check flwr==1.42.0; then
    run round_flower "$PY" scripts/bench_round.py flower --floats "$floats" --rounds 4 --work "$OUT/round-work"
  else
    echo "   round_flower: flwr could not be installed from PyPI (unreachable?)"
    echo '{"error": "flwr could not be installed from PyPI"}' > "$OUT/round_flower.json"
  fi
  rm -rf "$OUT/round-work"
fi

"$PY" - "$OUT" "$DEVICE" "$QUICK" "$SMOKE" "$PROFILE" "$(( $(date +%s) - START ))" <<'EOF'
import glob, json, os, platform, sys
out, device, quick, smoke, profile = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5]
wall_s = int(sys.argv[6])

def load(name):
    lines = [json.loads(l) for l in open(f"{out}/{name}.json") if l.strip()] if os.path.exists(f"{out}/{name}.json") else []
    return lines if len(lines) != 1 else lines[0]

result = {"device": device, "quick": quick, "smoke": smoke, "profile": profile, "machine": platform.machine(),
          "cores": os.cpu_count(), "load1": os.getloadavg()[0], "wall_s": wall_s, "benchmarks": {}}
rows = []
def pair(name, ours, peer, key, unit, rate=False):
    # rate: key is a throughput (higher is better), so peer time / ours = ours / peer.
    o, p = load(ours), load(peer)
    ratio = None
    if isinstance(o, dict) and isinstance(p, dict) and o.get(key) and p.get(key):
        ratio = round((o[key] / p[key]) if rate else (p[key] / o[key]), 3)
        short = lambda v: round(v, 3) if isinstance(v, float) else v
        rows.append((name, f"{short(o[key])} {unit}", f"{short(p[key])} {unit}", f"{ratio}x"))
    else:
        rows.append((name, "failed" if not isinstance(o, dict) or "error" in o else "", "failed", ""))
    result["benchmarks"][name] = {"ours": o, "peer": p, "peer_time_over_ours": ratio}

for f in sorted(glob.glob(f"{out}/train_ours_*.json")):
    tag = f.split("train_ours_")[1][:-5]
    pair(f"train step unet 47 classes {tag}", f"train_ours_{tag}", f"train_torch_{tag}", "ms_per_step", "ms")
pair("sliding-window predict", "predict_ours", "predict_torch", "seconds_per_volume", "s")
pair("  vs PyTorch channels-last", "predict_ours", "predict_torch_cl", "seconds_per_volume", "s")
pair("data path (samples/s)", "data", "data_nnunet", "samples_per_s", "/s", rate=True)
if os.path.exists(f"{out}/round_ours.json"):
    pair("deployed round, no training", "round_ours", "round_flower", "median_round_s", "s")
    o, p = load("round_ours"), load("round_flower")
    if isinstance(o, dict) and isinstance(p, dict) and o.get("peak_rss_mib") and p.get("peak_rss_mib"):
        rows.append(("  peak RSS, all processes", f"{o['peak_rss_mib']} MiB", f"{p['peak_rss_mib']} MiB",
                     f"{round(p['peak_rss_mib'] / o['peak_rss_mib'], 3)}x"))
for name in ["arch", "transfer", "transfer_wan", "round"]:
    result["benchmarks"][name] = {"ours": load(name), "peer": None}


# Every benchmark and its peer must have produced its figure (what --smoke checks).
def lines(v):
    return v if isinstance(v, list) else [v] if isinstance(v, dict) else []

def has(v, *keys):
    return bool(lines(v)) and all(all(l.get(k) is not None for k in keys) for l in lines(v))

d = result["benchmarks"]
missing = []
def expect(name, ok):
    if not ok:
        missing.append(name)

train = [n for n in d if n.startswith("train step")]
expect("train step", train)
for n in train:
    expect(f"{n} (ours)", has(d[n]["ours"], "ms_per_step"))
    expect(f"{n} (PyTorch)", has(d[n]["peer"], "ms_per_step"))
for n, peer in [("sliding-window predict", "PyTorch"), ("  vs PyTorch channels-last", "PyTorch channels-last")]:
    expect(f"{n.strip()} (ours)", has(d[n]["ours"], "seconds_per_volume"))
    expect(f"{n.strip()} ({peer})", has(d[n]["peer"], "seconds_per_volume"))
expect("data path (ours)", has(d["data path (samples/s)"]["ours"], "samples_per_s"))
expect("data path (nnU-Net)", has(d["data path (samples/s)"]["peer"], "samples_per_s"))
expect("arch", has(d["arch"]["ours"], "step_ms") and len(lines(d["arch"]["ours"])) == 2)
expect("transfer", has(d["transfer"]["ours"], "quic_down_MBps", "tcp_down_MBps"))
wan = lines(d["transfer_wan"]["ours"])
expect("transfer_wan", has(wan, "down_s", "up_s") and any(l.get("congestion") for l in wan)
       and any(l.get("transport") == "tls-over-tcp" for l in wan))
expect("round", has(d["round"]["ours"], "wall_s"))
if "deployed round, no training" in d:
    expect("deployed round (ours)", has(d["deployed round, no training"]["ours"], "median_round_s"))
    expect("deployed round (Flower)", has(d["deployed round, no training"]["peer"], "median_round_s"))
result["missing"] = missing
json.dump(result, open(f"{out}/bench.json", "w"), indent=1)
print(f"\n{'benchmark':<40}{'fedtalent':>14}{'peer':>14}{'peer/ours':>11}")
for r in rows:
    print(f"{r[0]:<40}{r[1]:>14}{r[2]:>14}{r[3]:>11}")
print(f"architectures: {d['arch']['ours']}\ntransfer: {d['transfer']['ours']}\ntransfer_wan: {d['transfer_wan']['ours']}\nround: {d['round']['ours']}")
print(f"\n{out}/bench.json ({wall_s} s with the build, load average {os.getloadavg()[0]:.2f})")
if missing:
    print(f"bench: no figure from: {', '.join(missing)} (see {out}/log.txt)")
    if smoke and os.path.exists(f"{out}/log.txt"):  # CI shows only this output: the log's end
        print("".join(open(f"{out}/log.txt", errors="replace").readlines()[-40:]), file=sys.stderr)
if smoke:
    print("bench: a smoke run (dev build, smallest shapes): these are not performance figures; "
          + ("FAILED" if missing else "every benchmark and its peer produced its figure"))
    sys.exit(1 if missing else 0)
EOF
