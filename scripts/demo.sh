#!/usr/bin/env bash
# The README's main command: a whole federation on this machine, the way a real one is set up.
#   phantom CT datasets for 3 sites (different, overlapping class sets) -> federation PKI
#   (CA, keys, certificate requests, signed certificates) -> coordinator + 3 site agents over
#   QUIC/mTLS on loopback -> a few rounds -> export -> predict a held-out phantom -> Dice table.
# Uses the GPU when there is one (device = auto). Output in demo-out/ (removed at the start).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${DEMO_ROUNDS:-6}"
STEPS="${DEMO_STEPS:-150}"
SITES=(liver pancreas multiorgan)

scripts/setup.sh
. scripts/env.sh
echo "== building"
cargo build --workspace --bins --quiet
BIN="$PWD/target/debug"
OUT="$PWD/demo-out"
rm -rf "$OUT"
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

echo "== 1. phantom datasets (nnU-Net v2 folders), one per hospital"
"$BIN/site-agent" synth --out "$OUT/data" --sites "$(IFS=,; echo "${SITES[*]}")" --cases 8 --shape 48 80 80

echo "== 2. the coordinator's operator creates the federation (CA, coordinator certificate, federation.toml)"
"$BIN/coordinator" init --dir "$OUT/coordinator" --name demo --listen "127.0.0.1:$PORT" --sites "$(IFS=,; echo "${SITES[*]}")" >/dev/null
sed -i -e 's/^preset = .*/preset = "tiny"/' -e "s/^rounds = .*/rounds = $ROUNDS/" -e "s/^local_steps = .*/local_steps = $STEPS/" \
       -e 's/^eval_every = .*/eval_every = 1/' -e 's/^round_deadline_s = .*/round_deadline_s = 900/' \
       -e 's/^exit_when_done = .*/exit_when_done = true/' "$OUT/coordinator/federation.toml"

echo "== 3. each site makes its key and a certificate request; the operator signs it"
for site in "${SITES[@]}"; do
  mkdir -p "$OUT/$site"
  "$BIN/site-agent" keygen --site "$site" --dir "$OUT/$site" >/dev/null
  "$BIN/coordinator" sign --config "$OUT/coordinator/federation.toml" --csr "$OUT/$site/$site.csr" | head -1
  python3 - "$OUT" "$site" "$PORT" <<'PY'
import json, sys
out, site, port = sys.argv[1], sys.argv[2], sys.argv[3]
entry = next(s for s in json.load(open(f"{out}/data/sites.json")) if s["name"] == site)
classes = ", ".join(f'{{ name = "{c["name"]}", labels = {c["labels"]} }}' for c in entry["classes"])
open(f"{out}/{site}/site.toml", "w").write(f'''[site]
name = "{site}"
coordinator = "127.0.0.1:{port}"
server_name = "localhost"
ca = "../coordinator/pki/ca.crt"
cert = "{site}.crt"
key = "{site}.key"
state_dir = "state"
device = "auto"
threads = 1

[data]
dataset_dir = "{entry["dataset_dir"]}"
cache_dir = "cache"
val_cases = 2
target_spacing = [2.5, 1.5, 1.5]
classes = [{classes}]
''')
PY
done
"$BIN/site-agent" check --config "$OUT/liver/site.toml" | tail -n +1 | head -20

echo "== 4. coordinator and site agents on loopback ($ROUNDS rounds x $STEPS local steps)"
"$BIN/coordinator" serve --config "$OUT/coordinator/federation.toml" 2>"$OUT/coordinator.log" &
COORD=$!
PIDS=()
for site in "${SITES[@]}"; do
  "$BIN/site-agent" run --config "$OUT/$site/site.toml" 2>"$OUT/$site.log" &
  PIDS+=($!)
done
trap 'kill $COORD "${PIDS[@]}" 2>/dev/null || true' EXIT
last=-1
while kill -0 $COORD 2>/dev/null; do
  sleep 2
  done_rounds=$(ls "$OUT/coordinator/state/rounds" 2>/dev/null | grep -c '^round-' || true)
  if [ "$done_rounds" != "$last" ]; then echo "   rounds complete: $done_rounds/$ROUNDS"; last=$done_rounds; fi
done
wait $COORD || { echo "coordinator failed; see $OUT/coordinator.log"; tail -20 "$OUT/coordinator.log"; exit 1; }
for pid in "${PIDS[@]}"; do wait "$pid"; done
"$BIN/coordinator" status --config "$OUT/coordinator/federation.toml" 2>/dev/null

echo "== 5. export the global MultiTalent model"
"$BIN/coordinator" export --config "$OUT/coordinator/federation.toml" --out "$OUT/model"

echo "== 6. predict the held-out phantom: one mask per class of every site"
"$BIN/site-agent" predict --model "$OUT/model" --input "$OUT/data/test/test_000_0000.nii.gz" --output "$OUT/masks" 2>/dev/null

echo "== 7. per-class Dice on the held-out phantom, against each site's own annotation protocol"
for site in "${SITES[@]}"; do
  eval_dir="$OUT/eval/$site"
  mkdir -p "$eval_dir/imagesTr" "$eval_dir/labelsTr"
  ln -sf "$OUT/data/test/test_000_0000.nii.gz" "$eval_dir/imagesTr/test_000_0000.nii.gz"
  ln -sf "$OUT/data/test/test_000_$site.nii.gz" "$eval_dir/labelsTr/test_000.nii.gz"
  dataset_dir=$(python3 -c "import json,sys; print(next(s['dataset_dir'] for s in json.load(open('$OUT/data/sites.json')) if s['name']=='$site'))")
  python3 -c "import json; d=json.load(open('$dataset_dir/dataset.json')); d['numTraining']=1; json.dump(d, open('$eval_dir/dataset.json','w'))"
  "$BIN/site-agent" evaluate --model "$OUT/model" --data "$eval_dir" --site "$site" --json "$OUT/eval/$site.json" 2>/dev/null
done
echo
echo "model:   $OUT/model (model.safetensors with nnU-Net v1 names + model.json)"
echo "masks:   $OUT/masks"
echo "metrics: $OUT/coordinator/state/metrics.jsonl"
