"""Paired intervals and the tail of one or several fidelity-benchmark runs on the same traces.

    python benchmarks/fidelity_intervals.py DIR [DIR ...] [--mine dynts] [--out DIR]

Reads DIR/per_trace.jsonl of each run (benchmarks/fidelity_paper.py), merges them on the traces they all hold (a
policy and budget two runs measured is taken from the first DIR), and prints, for `--mine` against every other
compressing policy at each budget, the paired bootstrap difference of answer-span KL over traces, and each
policy's worst trace (src/dynts/experiments/fidelity_intervals.py). A rerun of DynTS alone (a new head, oracle
scores) is so compared with the baselines of an earlier run without replaying them again. With --out, writes
OUT/intervals.json and OUT/intervals.md. Seconds, no model.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from dynts.errors import DynTSError
    from dynts.experiments import fidelity_intervals as intervals
    from dynts.experiments.fidelity_paper import PER_TRACE_FILE, control_label

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="benchmark output directories (the first one's traces and order)")
    p.add_argument("--mine", default=intervals.MINE, help="the policy compared with the others (default dynts)")
    p.add_argument("--control", default=None, help="the tail's control (default the prompt-protecting Window)")
    p.add_argument("--out", default=None, help="write intervals.json and intervals.md here")
    args = p.parse_args(argv)
    try:
        runs = [intervals.read_per_trace(f"{d}/{PER_TRACE_FILE}") for d in args.dirs]
        per_trace = intervals.merge_per_trace(runs)
        if not per_trace:
            raise DynTSError("the runs share no trace")
        control = args.control or control_label()
        if args.out:
            differences, _, text = intervals.write_report(per_trace, args.out, control, args.mine)
        else:
            differences, _, text = intervals.report(per_trace, control, args.mine)
    except DynTSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(per_trace)} traces\n\n{text}\n")
    for line in intervals.summary_lines(differences):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
