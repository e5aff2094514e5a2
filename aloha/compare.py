"""
Paired comparison of two closed-loop evaluations on the same seeds (evaluate.py's report.json files).

$ python aloha/compare.py out/aloha/eval_a/report.json out/aloha/eval_b/report.json
$ python aloha/compare.py A_1000.json,A_1050.json A_1000.json:baseline,B_1050.json:baseline   # seeds pooled

Each side is one or more reports (comma-separated; their episodes pooled), each optionally suffixed :policy (the
default) or :baseline. Both sides must hold the same seeds. For every reward stage (4 = success) it prints how
often each side reached it, on how many seeds only one did, and the exact two-sided McNemar p-value: the chance of
a split at least that uneven if both were equally good. Seeds are paired because the cube's position decides much
of an episode: two policies on the same 100 seeds differ far less by chance than two independent samples would.
"""

import argparse
import json
import math
import os
import sys


def mcnemar(only_a, only_b):
    """Exact two-sided McNemar p: the discordant pairs as a fair coin's binomial, both tails."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def load(side, flag):
    """({seed: highest reward stage} pooled over a side's reports, their task, a label for the side's column)."""
    stages, tasks, labels = {}, set(), []
    for item in side.split(","):
        path, _, entry = item.partition(":")
        entry = entry or "policy"
        try:
            with open(path) as f:
                report = json.load(f)
            tasks.add(report["settings"]["task"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"error: {flag} {path}: not a readable report.json ({type(e).__name__}: {e})")
        episodes = report.get(entry, {}).get("per_episode") if isinstance(report.get(entry), dict) else None
        if not episodes:
            sys.exit(f"error: {flag} {path}: holds no {entry} episodes (it has {', '.join(report) or 'nothing'})")
        for e in episodes:
            if e["seed"] in stages:
                sys.exit(f"error: {flag} {item}: seed {e['seed']} appears twice on this side")
            stages[e["seed"]] = e["max_reward"]
        labels.append(f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}:{entry}")
    if len(tasks) > 1:
        sys.exit(f"error: {flag} pools reports of different tasks ({', '.join(sorted(tasks))})")
    return stages, tasks.pop(), "+".join(dict.fromkeys(labels))


def compare(a, b):
    """Rows (stage, seeds a reached it on, seeds b did, only a, only b, McNemar p) of two {seed: stage} maps."""
    rows = []
    for stage in range(1, 5):
        hit_a = {s for s, r in a.items() if r >= stage}
        hit_b = {s for s, r in b.items() if r >= stage}
        only_a, only_b = len(hit_a - hit_b), len(hit_b - hit_a)
        rows.append((stage, len(hit_a), len(hit_b), only_a, only_b, mcnemar(only_a, only_b)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="REPORT[:policy|:baseline][,REPORT...]")
    p.add_argument("b", help="the same for the other side")
    args = p.parse_args(argv)
    (a, task_a, name_a), (b, task_b, name_b) = load(args.a, "A"), load(args.b, "B")
    # stage k means another thing in another task
    if task_a != task_b:
        sys.exit(f"error: A is {task_a} and B is {task_b}: compare evaluations of the same task")
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        sys.exit(
            f"error: the two sides hold different seeds ({len(diff)} not on both, e.g. {diff[0]}): "
            f"a paired comparison needs the same ones"
        )
    n = len(a)
    print(f"{n} paired seeds ({min(a)}..{max(a)}), {task_a}")
    print(f"A: {name_a}\nB: {name_b}")
    print(f"{'stage':>5} {'A':>9} {'B':>9} {'only A':>7} {'only B':>7} {'McNemar p':>10}")
    for stage, hit_a, hit_b, only_a, only_b, pval in compare(a, b):
        print(f"{stage:>5} {hit_a:>4}/{n:<4} {hit_b:>4}/{n:<4} {only_a:>7} {only_b:>7} {pval:>10.3g}")


if __name__ == "__main__":
    main()
