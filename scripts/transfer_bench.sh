#!/usr/bin/env bash
# Transfer benchmark (issue 16): is a federation's model a better start for a hospital whose
# structures the federation never saw than training from scratch? For each seed:
#   pre-training  `coordinator simulate` on the liver, pancreas and multi-organ phantom sites
#   scratch       `site-agent train` on a new site's phantoms (default: kidney + kidney tumour,
#                 classes no pre-training site annotates) from a fresh network
#   fine-tuned    `site-agent train --init` the pre-trained model on the same data, same steps
#                 (heads first, then the whole network: MultiTalent's transfer schedule)
# Both are scored on held-out phantoms of the new site (other seeds); prints a per-class Dice
# table (mean ± sd over seeds, the per-seed difference) and writes $OUT/transfer.json.
#
#   scripts/transfer_bench.sh
#   env: BENCH_OUT (transfer-bench-out), BENCH_SEEDS ("1 2 3"), BENCH_ROUNDS (40),
#        BENCH_STEPS (10: local steps per round), BENCH_TUNE_STEPS (200: steps on the new site,
#        both arms), BENCH_HEAD_STEPS (the fine-tune's heads-only steps; default its own, 10%),
#        BENCH_NEW_SITE (kidney), BENCH_CASES (8 per site, 2 of them validation),
#        BENCH_HELDOUT (4), BENCH_PRESET (tiny), BENCH_DEVICE (auto), BENCH_BIN (prebuilt
#        binaries' folder), BENCH_FED_ARGS (extra `simulate` flags),
#        BENCH_PRETRAINED (a quality_bench.sh output folder: its federated models fed-<seed>/model,
#        site configs included, are the pre-trained models instead of a new pre-training),
#        BENCH_DECODER_FROM (with a per-site-decoder model: the decoder the fine-tune starts
#        from, e.g. multiorgan, the site whose classes are nearest the new site's)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${BENCH_OUT:-$PWD/transfer-bench-out}"
SEEDS=(${BENCH_SEEDS:-1 2 3})
ROUNDS="${BENCH_ROUNDS:-40}"
STEPS="${BENCH_STEPS:-10}"
TUNE="${BENCH_TUNE_STEPS:-200}"
NEW_SITE="${BENCH_NEW_SITE:-kidney}"
CASES="${BENCH_CASES:-8}"
HELDOUT="${BENCH_HELDOUT:-4}"
PRESET="${BENCH_PRESET:-tiny}"
DEVICE="${BENCH_DEVICE:-auto}"
read -r -a FED_ARGS <<< "${BENCH_FED_ARGS:-}"
HEAD_ARGS=()
[ -z "${BENCH_HEAD_STEPS:-}" ] || HEAD_ARGS=(--head-steps "$BENCH_HEAD_STEPS")
[ -z "${BENCH_DECODER_FROM:-}" ] || HEAD_ARGS+=(--decoder-from "$BENCH_DECODER_FROM")
PRETRAINED="${BENCH_PRETRAINED:-}"

scripts/setup.sh >/dev/null
. scripts/env.sh
if [ -n "${BENCH_BIN:-}" ]; then BIN="$BENCH_BIN"; else
  cargo build --release --workspace --bins --quiet
  BIN="$PWD/target/release"
fi
rm -rf "$OUT"
mkdir -p "$OUT"
started=$(date +%s)

timed() { # label, command...
  local label=$1 t
  shift
  t=$(date +%s)
  "$@" >/dev/null 2>>"$OUT/log.txt"
  echo "   $label: $(( $(date +%s) - t )) s"
}

# A site config for the new site's phantoms: the pre-training federation's liver config (the
# same target spacing and threads) with the new site's name, dataset and classes.
new_site_config() { # seed
  local seed=$1 dataset
  dataset=$(ls -d "$OUT/new-$seed"/Dataset*_"$NEW_SITE")
  mkdir -p "$OUT/new-$seed/site"
  # The liver config without its classes (`[[data.classes]]` tables, last in the file), then the
  # new site's from synth's sites.json (label regions: a structure includes its tumour).
  sed -e "s|^name = .*|name = \"$NEW_SITE\"|" -e "s|^dataset_dir = .*|dataset_dir = \"$dataset\"|" \
    -e "s|^cache_dir = .*|cache_dir = \"$OUT/new-$seed/site/cache\"|" -e '/^\[\[data.classes\]\]/,$d' \
    "$OUT/pre-$seed/liver/site.toml" > "$OUT/new-$seed/site/site.toml"
  "$VIRTUAL_ENV/bin/python" -c '
import json, sys
site = next(s for s in json.load(open(sys.argv[1])) if s["name"] == sys.argv[2])
for c in site["classes"]:
    print("[[data.classes]]\nname = %s\nlabels = %s\n" % (json.dumps(c["name"]), c["labels"]))
' "$OUT/new-$seed/sites.json" "$NEW_SITE" >> "$OUT/new-$seed/site/site.toml"
  echo "$OUT/new-$seed/site/site.toml"
}

evaluate() { # model dir, seed, json
  "$BIN/site-agent" evaluate --model "$1" --data "$(ls -d "$OUT/heldout-$2"/Dataset*_"$NEW_SITE")" \
    --site "$NEW_SITE" --device "$DEVICE" --json "$3" >/dev/null 2>>"$OUT/log.txt"
}

for seed in "${SEEDS[@]}"; do
  pre="pre-training $ROUNDS x $STEPS on liver,pancreas,multiorgan"
  [ -z "$PRETRAINED" ] || pre="pre-trained: $PRETRAINED/fed-$seed/model"
  echo "== seed $seed: $pre; $TUNE steps on $NEW_SITE"
  if [ -n "$PRETRAINED" ]; then
    ln -sfn "$(readlink -f "$PRETRAINED/fed-$seed")" "$OUT/pre-$seed"
  else
    # One shared decoder: the new site has no decoder of its own in a per-site-decoder model.
    timed pre-training "$BIN/coordinator" simulate --out "$OUT/pre-$seed" --preset "$PRESET" \
      --sites liver,pancreas,multiorgan --seed "$seed" --rounds "$ROUNDS" --local-steps "$STEPS" \
      --cases "$CASES" --device "$DEVICE" --per-site-decoders false "${FED_ARGS[@]}"
  fi
  "$BIN/site-agent" synth --out "$OUT/new-$seed" --seed $((500 + seed)) --cases "$CASES" --sites "$NEW_SITE" \
    >/dev/null 2>>"$OUT/log.txt"
  "$BIN/site-agent" synth --out "$OUT/heldout-$seed" --seed $((1000 + seed)) --cases "$HELDOUT" \
    --sites "$NEW_SITE" >/dev/null 2>>"$OUT/log.txt"
  config=$(new_site_config "$seed")
  timed scratch "$BIN/site-agent" train --site "$config" --preset "$PRESET" --steps "$TUNE" --seed "$seed" \
    --device "$DEVICE" --out "$OUT/scratch-$seed"
  evaluate "$OUT/scratch-$seed/model" "$seed" "$OUT/scratch-$seed/heldout.json"
  timed fine-tuned "$BIN/site-agent" train --site "$config" --init "$OUT/pre-$seed/model" "${HEAD_ARGS[@]}" \
    --steps "$TUNE" --seed "$seed" --device "$DEVICE" --out "$OUT/tuned-$seed"
  evaluate "$OUT/tuned-$seed/model" "$seed" "$OUT/tuned-$seed/heldout.json"
done
echo "== total $(( $(date +%s) - started )) s"

"$VIRTUAL_ENV/bin/python" - "$OUT" "${SEEDS[@]}" <<'EOF'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
arms = ("scratch", "tuned")

def dice(path):
    """Per-class mean Dice over the held-out cases of one `site-agent evaluate --json`."""
    return {c["id"]: c["mean_dice"] for c in json.load(open(path))["classes"] if c["mean_dice"] is not None}

runs = {s: {a: dice(f"{out}/{a}-{s}/heldout.json") for a in arms} for s in seeds}
classes = sorted(runs[seeds[0]]["scratch"])
def stats(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
print(f"\nheld-out Dice of the new site, mean ± sd over seeds {' '.join(seeds)} ({out}/transfer.json)")
print(f"{'class':<28}{'from scratch':>16}{'fine-tuned':>16}   per seed fine-tuned - scratch")
table = {}
rows = classes + ["mean"]
for c in rows:
    per = {a: [(statistics.mean(runs[s][a].values()) if c == "mean" else runs[s][a][c]) for s in seeds] for a in arms}
    table[c] = {a: stats(per[a]) for a in arms}
    diffs = " ".join(f"{t - f:+.3f}" for f, t in zip(per["scratch"], per["tuned"]))
    print(f"{c:<28}" + "".join(f"{m:>9.3f} ± {sd:.3f}" for m, sd in table[c].values()) + f"   {diffs}")
json.dump({"seeds": seeds, "runs": runs, "table": table}, open(f"{out}/transfer.json", "w"), indent=1)
better = table["mean"]["tuned"][0] > table["mean"]["scratch"][0]
print(f"\ntarget (issue 16): fine-tuned mean {table['mean']['tuned'][0]:.3f} > from scratch "
      f"{table['mean']['scratch'][0]:.3f}: {'met' if better else 'NOT met'}")
EOF
