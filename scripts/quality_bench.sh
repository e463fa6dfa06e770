#!/usr/bin/env bash
# Quality benchmark: does federating help? For each seed, the same phantom sites and the same
# local steps per site are trained three ways, and every model is scored on held-out phantoms
# of other seeds (each site's own annotation protocol):
#   alone      `site-agent train` on one site's data (one model per site)
#   pooled     `site-agent train` on all sites' data (MultiTalent's own, centralised setting;
#              as many steps as all sites together)
#   federated  `coordinator simulate` (QUIC + mTLS on loopback, one site agent per site)
#   fine-tuned with BENCH_FINETUNE_STEPS=F: the federation stops F steps early and each site
#              fine-tunes its model on its own data for the last F steps (`site-agent train
#              --init`): the same steps per site, a model personalised to each site
# Every arm's model is post-processed as its sites would (`site-agent train` and `coordinator
# simulate` end with `site-agent postprocess`: per class, the largest connected component where
# that raised the Dice on the site's validation cases), and evaluated with it.
# Prints a per-class Dice table (mean ± sd over seeds) with the three side by side, the mean per
# site and the sd of the per-seed means, and writes $OUT/quality.json.
#
#   scripts/quality_bench.sh
#   env: BENCH_OUT (quality-bench-out), BENCH_SEEDS ("1 2 3"), BENCH_ROUNDS (200),
#        BENCH_STEPS (10: local steps per round), BENCH_CASES (8 per site, 2 of them validation),
#        BENCH_HELDOUT (12 cases per site, phantoms of seed 2000 + seed),
#        BENCH_SITES (liver,pancreas,multiorgan),
#        BENCH_PRESET (small), BENCH_DEVICE (auto), BENCH_BIN (prebuilt binaries' folder),
#        BENCH_FED_ARGS (extra `simulate` flags; its defaults are per-site decoders,
#        e.g. "--optimizer-state reset --head-warmup-steps 10"), BENCH_COMPARE_ARGS (a second
#        federation per seed with these flags, appended after the others so they override them,
#        shown as "federated-b": a policy comparison, e.g. "--per-site-decoders false" or
#        "--rounds 10 --local-steps 40"; default "none"; a fourth arm adds a federation per seed),
#        BENCH_JOBS (single-threaded slots of the job pool, default twice the cores),
#        BENCH_FINETUNE_STEPS (0: steps of the fine-tuned arm, a multiple of BENCH_STEPS),
#        BENCH_ARMS ("alone pooled": the arms besides the federation, which always runs since
#        the others read its site configs; e.g. "alone" or "" to compare federation policies),
#        BENCH_REUSE (an earlier run's quality.json: the table takes the arms this run skipped
#        from it; alone and pooled are fully seeded, so the same seeds and steps give the same)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${BENCH_OUT:-$PWD/quality-bench-out}"
SEEDS=(${BENCH_SEEDS:-1 2 3})
# 200 x 10 = 2,000 steps per site: at 1,000 every arm is still far from trained (each site alone
# rose from 0.753 to 0.843 mean held-out Dice between 1,000 and 2,000 steps, seeds 2 and 3), so a
# comparison there says more about how fast each arm learns than about the model it ends with.
# Cost on a CPU: 9 trainings of 2,000 steps per seed (3 alone, pooled 6,000, 3 federated site
# agents), ~0.7 CPU-s per `small` step on this 2-core VM. Timed whole there: ~1,180 s fixed
# (mostly the held-out evaluations) + ~124 s per round for three seeds, about 7 h at 200 rounds
# (docs/quality-bench-time-2026-12-07.txt). On a GPU (BENCH_DEVICE auto picks it) steps are cheap.
ROUNDS="${BENCH_ROUNDS:-200}"
STEPS="${BENCH_STEPS:-10}"
CASES="${BENCH_CASES:-8}"
# 12 held-out phantoms per site (seed 2000 + seed), as the README's figures are measured: more
# lesions behind each tumour's Dice than the 4 of earlier runs (seed 1000 + seed).
HELDOUT="${BENCH_HELDOUT:-12}"
SITES="${BENCH_SITES:-liver,pancreas,multiorgan}"
PRESET="${BENCH_PRESET:-small}"
DEVICE="${BENCH_DEVICE:-auto}"
read -r -a FED_ARGS <<< "${BENCH_FED_ARGS:-}"
COMPARE="${BENCH_COMPARE_ARGS:-none}"
read -r -a COMPARE_ARGS <<< "$COMPARE"
IFS=',' read -r -a SITE_LIST <<< "$SITES"
TOTAL=$((ROUNDS * STEPS))
FINETUNE="${BENCH_FINETUNE_STEPS:-0}"
ARMS=" ${BENCH_ARMS-alone pooled} "
if [ "$FINETUNE" -gt 0 ]; then
  if [ $((FINETUNE % STEPS)) -ne 0 ] || [ "$FINETUNE" -ge "$TOTAL" ]; then
    echo "BENCH_FINETUNE_STEPS=$FINETUNE: a multiple of BENCH_STEPS=$STEPS below $TOTAL steps" >&2; exit 2
  fi
fi
FED_ROUNDS=$(( (TOTAL - FINETUNE) / STEPS ))

scripts/setup.sh >/dev/null
. scripts/env.sh
# BENCH_BIN: binaries built elsewhere (e.g. a copy, so that a rebuild during a long run cannot
# swap them mid-way); nothing is built then.
if [ -n "${BENCH_BIN:-}" ]; then BIN="$BENCH_BIN"; else
  [ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release --workspace --bins --quiet
  BIN="$PWD/target/release"
fi
rm -rf "$OUT"
mkdir -p "$OUT"
started=$(date +%s)

# Every arm is a job on a pool of single-threaded slots (BENCH_JOBS, default twice the cores):
# a federation takes one slot per site agent, a training or an evaluation one. One libtorch
# process with a thread per core keeps 2 cores ~65 % busy on the small preset; the same work in
# single-threaded processes side by side keeps them full (a federation's three 1-thread agents ran
# 1.5x the steps per second of one 2-thread `site-agent train`). Seeds run side by side, so the
# next seed's federation overlaps the last one's alone and pooled arms.
# (nproc before OMP_NUM_THREADS is set: GNU nproc reports that variable, not the cores.)
SLOTS="${BENCH_JOBS:-$(( $(nproc) * 2 ))}"
export OMP_NUM_THREADS=1
mkfifo "$OUT/.slots"
exec 9<>"$OUT/.slots"
for ((i = 0; i < SLOTS; i++)); do printf x >&9; done
# Whole-job acquisition under a lock: two federations each holding part of their slots would
# otherwise wait on each other forever.
acquire() { local _; ( flock 7; read -r -N "$1" -u 9 _ ) 7>"$OUT/.slots.lock"; }
release() { local i; for ((i = 0; i < $1; i++)); do printf x >&9; done; }
job() { # slots, command...: runs the command on that many slots
  local n=$1 rc=0
  [ "$n" -le "$SLOTS" ] || n=$SLOTS
  shift
  acquire "$n"
  "$@" || rc=$?
  release "$n"
  return $rc
}
# Background jobs, waited for one by one so that a failed arm fails the benchmark.
wait_all() { local pid rc=0; for pid in "$@"; do wait "$pid" || rc=1; done; return $rc; }

evaluate() { # model dir, seed, json prefix
  for dataset in "$OUT/heldout-$2"/Dataset*; do
    local site="${dataset##*/}"; site="${site#Dataset*_}"
    [ -f "$1/model.json" ] || continue
    if grep -q "\"site\": \"$site\"" "$1/model.json"; then
      "$BIN/site-agent" evaluate --model "$1" --data "$dataset" --site "$site" --device "$DEVICE" \
        --json "$3_$site.json" >/dev/null 2>>"$OUT/log.txt" \
        || { echo "   evaluation of $1 on $site FAILED (see $OUT/log.txt)" >&2; return 1; }
    fi
  done
}

train_arm() { # seed, label, output folder, `site-agent train` flags...
  local seed=$1 label=$2 dir=$3 t
  shift 3
  t=$(date +%s)
  "$BIN/site-agent" train "$@" --seed "$seed" --device "$DEVICE" --out "$dir" >/dev/null 2>>"$OUT/log.txt" \
    || { echo "   seed $seed, $label FAILED (see $OUT/log.txt)" >&2; return 1; }
  echo "   seed $seed, $label: $(( $(date +%s) - t )) s"
  evaluate "$dir/model" "$seed" "$dir/heldout"
}

federate() { # seed, folder prefix, label, simulate flags...
  local seed=$1 prefix=$2 dir="$OUT/$2-$1" label=$3 t
  shift 3
  t=$(date +%s)
  "$BIN/coordinator" simulate --out "$dir" --preset "$PRESET" --sites "$SITES" --seed "$seed" \
    --rounds "$FED_ROUNDS" --local-steps "$STEPS" --cases "$CASES" --device "$DEVICE" "$@" >/dev/null 2>>"$OUT/log.txt" \
    || { echo "   seed $seed, $label FAILED (see $OUT/log.txt)" >&2; return 1; }
  echo "   seed $seed, $label: $(( $(date +%s) - t )) s"
}

fine_tune() { # seed, folder prefix, label
  local seed=$1 prefix=$2 dir="$OUT/$2-$1" label=$3 site pids=()
  [ "$FINETUNE" -gt 0 ] || return 0
  for site in "${SITE_LIST[@]}"; do
    job 1 train_arm "$seed" "$label, $site fine-tuned" "$OUT/${prefix}ft-$seed-$site" \
      --init "$dir/model" --site "$dir/$site/site.toml" --steps "$FINETUNE" &
    pids+=($!)
  done
  wait_all "${pids[@]}"
}

run_seed() { # seed: its federation, then the arms that read its site configs, side by side
  local seed=$1 site pids=() site_args=()
  "$BIN/site-agent" synth --out "$OUT/heldout-$seed" --seed $((2000 + seed)) --cases "$HELDOUT" \
    --sites "$SITES" >/dev/null 2>>"$OUT/log.txt" || return 1
  if [ "$COMPARE" != none ]; then
    { job "${#SITE_LIST[@]}" federate "$seed" fedb "federated-b ($COMPARE)" "${COMPARE_ARGS[@]}" \
        && job 1 evaluate "$OUT/fedb-$seed/model" "$seed" "$OUT/fedb-$seed/heldout" \
        && fine_tune "$seed" fedb "federated-b"; } &
    pids+=($!)
  fi
  job "${#SITE_LIST[@]}" federate "$seed" fed federated "${FED_ARGS[@]}" || { wait_all "${pids[@]}"; return 1; }
  job 1 evaluate "$OUT/fed-$seed/model" "$seed" "$OUT/fed-$seed/heldout" &
  pids+=($!)
  fine_tune "$seed" fed federated &
  pids+=($!)
  # The same phantoms and site configs as the federation (and its preprocessing cache).
  for site in "${SITE_LIST[@]}"; do
    site_args+=(--site "$OUT/fed-$seed/$site/site.toml")
    [[ "$ARMS" == *" alone "* ]] || continue
    job 1 train_arm "$seed" "alone $site" "$OUT/alone-$seed-$site" \
      --site "$OUT/fed-$seed/$site/site.toml" --preset "$PRESET" --steps "$TOTAL" &
    pids+=($!)
  done
  if [[ "$ARMS" == *" pooled "* ]]; then
    job 1 train_arm "$seed" pooled "$OUT/pooled-$seed" "${site_args[@]}" --preset "$PRESET" \
      --steps $((TOTAL * ${#SITE_LIST[@]})) &
    pids+=($!)
  fi
  wait_all "${pids[@]}"
}

echo "== seeds ${SEEDS[*]}: $TOTAL steps per site ($FED_ROUNDS rounds x $STEPS federated, $FINETUNE fine-tuned);" \
  "$HELDOUT held-out phantoms per site of seed 2000 + seed; $SLOTS single-threaded slots"
seed_pids=()
for seed in "${SEEDS[@]}"; do
  run_seed "$seed" &
  seed_pids+=($!)
done
wait_all "${seed_pids[@]}"
echo "== total $(( $(date +%s) - started )) s"

"$VIRTUAL_ENV/bin/python" scripts/quality_table.py "$OUT" "${SEEDS[@]}" ${BENCH_REUSE:+--reuse "$BENCH_REUSE"}
