#!/usr/bin/env python3
"""Leave-one-category-out evaluation of tidemark's anomaly scores on NAB-style data.

For every candidate configuration (the cartesian product of the `--grid` settings,
passed to `tidemark score-csv` as TIDEMARK__SCORING__* environment variables), the
data is scored once. Then, for each category H: the candidate and the threshold that
score best on the *other* categories are chosen (as NAB chooses its threshold), and
H is scored with exactly that candidate and threshold. Printed: the in-sample score
of the default configuration, each held-out score, their mean, and the pooled
held-out score (every category scored with its own fold's choice, normalised over
all windows together).

usage: scripts/nab-loco.py --tidemark target/release/tidemark --data DIR \
         --labels DIR/labels.json --nab-tools DIR_WITH_nab_score.py --out out/loco \
         [--grid refractory_windows=200,300,400 ...] [--profile standard]

The NAB scoring rules come from nab_score.py in --nab-tools (imported, not copied), so
the held-out scores are computed exactly as the in-sample ones are.
"""
import argparse
import csv
import glob
import itertools
import json
import os
import subprocess
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tidemark", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--nab-tools", required=True)
    parser.add_argument("--out", default="out/loco")
    parser.add_argument("--grid", nargs="*", default=[], help="scoring key=v1,v2,...")
    parser.add_argument("--profile", default="standard")
    args = parser.parse_args()
    sys.path.insert(0, args.nab_tools)
    import nab_score  # noqa: E402

    tp_w, fp_w, fn_w = nab_score.PROFILES[args.profile]
    keys = [g.split("=", 1)[0] for g in args.grid]
    values = [g.split("=", 1)[1].split(",") for g in args.grid]
    # Candidate 0 is the configuration as it is (the in-sample figure); then the grid.
    candidates = [{}] + [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    labels = json.load(open(args.labels))
    categories = sorted({rel.split("/")[0] for rel in labels})
    rows_of = {}
    for rel in labels:
        data = os.path.join(args.data, rel)
        if os.path.exists(data):
            rows_of[rel] = [(nab_score.ts(r["timestamp"]), r["value"]) for r in csv.DictReader(open(data))]

    # points[candidate][category] = NAB points of that category's files.
    points = []
    for number, candidate in enumerate(candidates):
        out = os.path.join(args.out, f"c{number}")
        env = dict(os.environ)
        for key, value in candidate.items():
            env[f"TIDEMARK__SCORING__{key.upper()}"] = value
        subprocess.run([args.tidemark, "score-csv", "--input", args.data, "--output", out], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        by_category = {c: [] for c in categories}
        for rel, rows in rows_of.items():
            category = rel.split("/")[0]
            (result,) = glob.glob(os.path.join(out, category, "*" + os.path.basename(rel)))
            scores = [float(r["anomaly_score"]) for r in csv.DictReader(open(result))]
            by_category[category].extend(nab_score.points_of(rows, scores, labels[rel], rel, tp_w, fp_w))
        points.append(by_category)

    def windows_in(cats):
        return sum(len(labels[rel]) for rel in rows_of if rel.split("/")[0] in cats)

    def normalised(raw, cats):
        windows = windows_in(cats)
        null, perfect = -fn_w * windows, tp_w * windows
        return None if perfect == null else 100 * (raw - null) / (perfect - null)

    def raw_at(pts, threshold):
        parts = {wid: -fn_w for _, _, wid in pts if wid is not None}
        total = sum(parts.values())
        for score, sweep, wid in pts:
            if score < threshold:
                continue
            if wid is None:
                total += sweep
            elif sweep > parts[wid]:
                total += sweep - parts[wid]
                parts[wid] = sweep
        return total

    everything = [p for c in categories for p in points[0][c]]
    raw, threshold = nab_score.best(list(everything), fn_w)
    print(f"in-sample ({args.profile}, default configuration): {normalised(raw, categories):.2f} at threshold {threshold:.4g}")
    print(f"{'held out':24s} {'held-out score':>14s} {'tuned score':>11s}  threshold  chosen configuration")
    pooled_raw, held_scores = 0.0, []
    for held in categories:
        train = [c for c in categories if c != held]
        best = None
        for number, by_category in enumerate(points):
            raw, threshold = nab_score.best([p for c in train for p in by_category[c]], fn_w)
            if best is None or raw > best[0]:
                best = (raw, threshold, number)
        raw_train, threshold, number = best
        raw_held = raw_at(points[number][held], threshold)
        pooled_raw += raw_held
        score = normalised(raw_held, [held])
        shown = "n/a (no windows)" if score is None else f"{score:.2f}"
        if score is not None:
            held_scores.append(score)
        false_alarms = sum(1 for s, _, wid in points[number][held] if wid is None and s >= threshold)
        print(f"{held:24s} {shown:>14s} {normalised(raw_train, train):11.2f}  {threshold:.4g}  "
              f"{candidates[number] or 'defaults'}; {false_alarms} detections outside windows")
    if held_scores:
        print(f"mean of the held-out scores: {sum(held_scores) / len(held_scores):.2f} ({len(held_scores)} categories with windows)")
    print(f"pooled held-out score: {normalised(pooled_raw, categories):.2f}")


if __name__ == "__main__":
    main()
