"""``lrmt report DIR...``: the paper's Table 1 over several finished experiments (one column per
``results.json``, joint readout at the last step), plus each experiment's own table."""
from __future__ import annotations

import argparse
import os

HELP = "combine the results.json of several runs into the paper's Table 1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (or results.json files)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the markdown here")
    p.add_argument("--details", action="store_true", help="print each run's own table too")


def run(args: argparse.Namespace) -> int:
    from lrmt_fast.results import combined_table, format_table, load_results

    results = []
    for d in args.dirs:
        path = d if d.endswith(".json") else os.path.join(d, "results.json")
        results.append(load_results(path, required_methods=[]))
    titles = [f"{r['experiment']} ({r['profile']})" for r in results]
    text = combined_table(results, titles)
    if args.details:
        text += "\n" + "\n".join(format_table(r) for r in results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0
