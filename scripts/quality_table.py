"""Table of scripts/quality_bench.sh: per-class held-out Dice of alone / pooled / federated training,
mean ± sd over seeds, the per-site means, the issue's targets checked, and quality.json.

usage: quality_table.py OUT SEED [SEED ...] [--reuse QUALITY_JSON]

--reuse: the arms this run did not train (no model folders under OUT) are read from an earlier
run's quality.json, e.g. alone and pooled at the same seeds and steps: both are fully seeded, so
rerunning them gives the same models. The table names what it reused.
"""
import glob
import json
import os
import statistics
import sys

args = sys.argv[1:]
reuse = None
if "--reuse" in args:
    i = args.index("--reuse")
    reuse = args[i + 1]
    del args[i:i + 2]
out, seeds = args[0], args[1:]
METHODS = ["alone", "pooled", "federated", "fine-tuned", "federated-b"]


def read(pattern):
    """class id -> mean Dice, from the evaluate JSONs matching pattern."""
    dice = {}
    for f in sorted(glob.glob(pattern)):
        for c in json.load(open(f))["classes"]:
            if c["mean_dice"] is not None:
                dice[c["id"]] = c["mean_dice"]
    return dice


def read_all(folders):
    """class id -> mean Dice over the per-site model folders matching `folders`."""
    dice = {}
    for d in glob.glob(folders):
        dice.update(read(f"{d}/heldout_*.json"))
    return dice


# per seed: method -> class id -> Dice
runs = {}
for s in seeds:
    runs[s] = {
        "alone": read_all(f"{out}/alone-{s}-*"),
        "pooled": read(f"{out}/pooled-{s}/heldout_*.json"),
        "federated": read(f"{out}/fed-{s}/heldout_*.json"),
        "fine-tuned": read_all(f"{out}/fedft-{s}-*"),
        "federated-b": read(f"{out}/fedb-{s}/heldout_*.json"),
    }

reused = []
if reuse:
    earlier = json.load(open(reuse))["runs"]
    for m in METHODS:
        if not any(runs[s][m] for s in seeds) and all(earlier.get(s, {}).get(m) for s in seeds):
            for s in seeds:
                runs[s][m] = earlier[s][m]
            reused.append(m)

classes = sorted({c for r in runs.values() for m in r.values() for c in m})
sites = sorted({c.split("/")[0] for c in classes})


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def num(v):
    return "-" if v is None else f"{v:.3f}"


def fmt(mean_sd):
    m, sd = mean_sd
    return "   -        " if m is None else f"{m:.3f} ± {sd:.3f}"


table = {}
print(f"\nheld-out Dice, mean ± sd over seeds {' '.join(seeds)} ({out}/quality.json)")
if reused:
    print(f"reused from {reuse} (same seeds and steps, fully seeded): {', '.join(reused)}")
print(f"{'class':<28}" + "".join(f"{m:>16}" for m in METHODS))
for c in classes:
    row = {m: stats([runs[s][m].get(c) for s in seeds]) for m in METHODS}
    table[c] = row
    print(f"{c:<28}" + "".join(f"{fmt(row[m]):>16}" for m in METHODS))

# The mean over a site's classes, per seed (None where the method did not run), then over seeds.
by_seed = {}
for site in sites + ["all"]:
    own = [c for c in classes if site == "all" or c.startswith(site + "/")]
    by_seed[site] = {
        m: {s: statistics.mean([runs[s][m].get(c, 0.0) for c in own]) if runs[s][m] else None for s in seeds}
        for m in METHODS
    }
site_means = {site: {m: stats(by_seed[site][m].values()) for m in METHODS} for site in by_seed}
print()
for site in by_seed:
    print(f"{'mean ' + site:<28}" + "".join(f"{fmt(site_means[site][m]):>16}" for m in METHODS))

# The same per seed: a mean that meets a target can hide a seed that does not.
ran = [m for m in METHODS if any(runs[s][m] for s in seeds)]
print(f"\nper seed, mean over each site's classes ({' / '.join(ran)})")
for s in seeds:
    cells = [f"{site} " + " / ".join(num(by_seed[site][m][s]) for m in ran) for site in by_seed]
    print(f"  seed {s}: " + "; ".join(cells))



def check(ok, text):
    print(f"  [{'x' if ok else ' '}] {text}")
    return ok


def mean_of(c, m):
    return table.get(c, {}).get(m, (None, None))[0]


def targets(method):
    """The issue's targets for `method`'s models (federated, or federated then fine-tuned)."""
    print(f"\ntargets (issue 13), {method}:")
    results = []
    for site in sites:
        a, f = site_means[site]["alone"][0], site_means[site][method][0]
        results.append(check(a is not None and f is not None and f >= a, f"{site}: {method} mean {num(f)} >= alone {num(a)}"))
    f_all, p_all = site_means["all"][method][0], site_means["all"]["pooled"][0]
    results.append(check(f_all is not None and p_all is not None and f_all >= p_all - 0.03,
                         f"{method} mean {num(f_all)} within 0.03 of pooled {num(p_all)}"))
    for c in classes:
        name = c.split("/")[1]
        f = mean_of(c, method)
        if name in ("liver", "kidneys", "spleen"):
            results.append(check(f is not None and f >= 0.85, f"{c}: {method} {num(f)} >= 0.85"))
        if name.endswith("tumour"):
            a = mean_of(c, "alone")
            results.append(check(f is not None and a is not None and f >= 0.9 * a,
                                 f"{c}: {method} {num(f)} >= 0.9 x alone {num(a)}"))
    sd = site_means["all"][method][1]
    results.append(check(len(seeds) >= 2 and sd is not None and sd <= 0.05,
                         f"sd of the per-seed {method} mean {num(sd)} <= 0.05 (needs >= 2 seeds)"))
    print(f"  {sum(results)}/{len(results)} met")


for method in ("federated", "fine-tuned"):
    if any(runs[s][method] for s in seeds):
        targets(method)

json.dump(
    {"seeds": seeds, "runs": runs, "classes": {c: {m: list(v) for m, v in r.items()} for c, r in table.items()},
     "site_means": {s: {m: list(v) for m, v in r.items()} for s, r in site_means.items()}},
    open(os.path.join(out, "quality.json"), "w"), indent=2)
