"""Regenerate a comparison's report from its records, training and evaluating nothing (no data needed).

    python benchmarks/report.py benchmarks/results/ablation-converged-e270
    python benchmarks/report.py benchmarks/results/ablation-short --default split_last_ce_ft

Reads ``runs/*.json``, ``compute.json`` and ``test.json`` of a `compare` output folder
(`CompareResult.load`) and rewrites its results.json, results.md and accuracy_vs_compute.png: the rows
finished on every seed asked for, the choice on validation, the test accuracy of the declared rows only
(once every row has finished), and the verdict with the statistics the seeds carry. Folders written by
earlier versions (rows named baseline_continued / baseline_equal, controls without their own settings,
test accuracy measured blind at each row's end) are read as they are and marked so in the notes.
"""
import argparse
import sys
from typing import List, Optional

from encodenet_timm.result import CompareResult


def main(argv: Optional[List[str]] = None) -> CompareResult:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a compare output folder (holds runs/ and compute.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed with a baseline")
    p.add_argument("--default", default="encodenet", help="the EncodeNet row the verdict speaks for")
    args = p.parse_args(argv)
    result = CompareResult.load(args.folder, seeds=args.seeds, default=args.default)
    result.save(args.folder)
    print(result.table())
    print(result.verdict, file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
