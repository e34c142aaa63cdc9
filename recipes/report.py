"""Draw a run report (report.md, results table, PNG learning curves) from the files runs wrote.

python recipes/report.py outputs/main              # redraw a main job's report, into outputs/main
python recipes/report.py --out docs/x --title "ReFT, TP=1 vs TP=2" tp1=outputs/a tp2=outputs/b
"""

import argparse

from carft_nemo.reporting.report import stages_of, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="a main job's output folder, or NAME=RUN_DIR for each run")
    parser.add_argument("--out", help="where report.md and its PNGs go (default: the main job's folder)")
    parser.add_argument("--title", default="carft-nemo report")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    args = parser.parse_args()
    try:
        stages = stages_of(args.runs)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    out = args.out or (args.runs[0] if "=" not in args.runs[0] and len(args.runs) == 1 else None)
    if out is None:
        parser.exit(2, "error: --out is required with NAME=RUN_DIR runs\n")
    print(write_report(out, stages, title=args.title, notes=args.note))


if __name__ == "__main__":
    main()
