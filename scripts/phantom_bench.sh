#!/usr/bin/env bash
# Phantom benchmark: the same federation (sites, seed, rounds, local steps) once per network
# variant, then per-class Dice of each exported model on held-out phantoms (a fresh seed, every
# site's own annotation protocol). Prints one table, variants side by side, and writes
# $OUT/dice.json.
#
#   scripts/phantom_bench.sh [VARIANT ...]     VARIANT: a preset, or PRESET+decoders for
#                                               FIRENet's per-site decoders
#   default variants: tiny firenet-tiny firenet-tiny+decoders
#   env: BENCH_OUT (phantom-bench-out), BENCH_ROUNDS (6), BENCH_STEPS (250), BENCH_SITES
#        (liver,pancreas,multiorgan), BENCH_HELDOUT (4 cases per site), BENCH_DEVICE (auto),
#        BENCH_SEED (0: the training phantoms and the federation; held-out cases use 1000 + it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(tiny firenet-tiny firenet-tiny+decoders)
OUT="${BENCH_OUT:-$PWD/phantom-bench-out}"
ROUNDS="${BENCH_ROUNDS:-6}"
STEPS="${BENCH_STEPS:-250}"
SITES="${BENCH_SITES:-liver,pancreas,multiorgan}"
HELDOUT="${BENCH_HELDOUT:-4}"
DEVICE="${BENCH_DEVICE:-auto}"
SEED="${BENCH_SEED:-0}"

scripts/setup.sh >/dev/null
. scripts/env.sh
cargo build --workspace --bins --quiet
BIN="$PWD/target/debug"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== held-out phantoms: $HELDOUT cases per site, seed $((1000 + SEED)) (training uses seed $SEED)"
"$BIN/site-agent" synth --out "$OUT/heldout" --seed $((1000 + SEED)) --cases "$HELDOUT" --sites "$SITES" >/dev/null

for variant in "${VARIANTS[@]}"; do
  preset="${variant%+decoders}"
  extra=(--per-site-decoders false)
  [ "$variant" != "$preset" ] && extra=(--per-site-decoders true)
  echo "== $variant: $ROUNDS rounds x $STEPS local steps"
  start=$(date +%s)
  "$BIN/coordinator" simulate --out "$OUT/$variant" --preset "$preset" "${extra[@]}" --sites "$SITES" \
    --rounds "$ROUNDS" --local-steps "$STEPS" --device "$DEVICE" --seed "$SEED" 2>/dev/null >/dev/null
  echo "   $(( $(date +%s) - start )) s"
  for dataset in "$OUT"/heldout/Dataset*; do
    site="${dataset##*/}"; site="${site#Dataset*_}"
    "$BIN/site-agent" evaluate --model "$OUT/$variant/model" --data "$dataset" --site "$site" --device "$DEVICE" \
      --json "$OUT/$variant/heldout_$site.json" 2>/dev/null >/dev/null
  done
done

python3 - "$OUT" "${VARIANTS[@]}" <<'EOF'
import glob, json, sys
out, variants = sys.argv[1], sys.argv[2:]
dice = {}  # class id -> variant -> mean Dice
for v in variants:
    for f in sorted(glob.glob(f"{out}/{v}/heldout_*.json")):
        for c in json.load(open(f))["classes"]:
            dice.setdefault(c["id"], {})[v] = c["mean_dice"]
width = max(12, *(len(v) for v in variants))
print(f"\nper-class Dice on held-out phantoms ({out}/dice.json)")
print(f"{'class':30}" + "".join(f"{v:>{width + 2}}" for v in variants))
for cls, row in dice.items():
    print(f"{cls:30}" + "".join(f"{row.get(v, float('nan')):>{width + 2}.4f}" for v in variants))
means = {v: sum(r[v] for r in dice.values() if v in r) / max(1, sum(v in r for r in dice.values())) for v in variants}
print(f"{'mean':30}" + "".join(f"{means[v]:>{width + 2}.4f}" for v in variants))
json.dump({"per_class": dice, "mean": means}, open(f"{out}/dice.json", "w"), indent=2)
EOF
