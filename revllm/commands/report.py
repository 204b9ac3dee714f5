"""``revllm report``: Markdown + PNG comparison of one or more training runs."""

from __future__ import annotations

from ..train.report import write_report


def add_parser(sub):
    p = sub.add_parser("report", help="write a Markdown report (table + loss/memory/throughput plots) of runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories of `revllm train`")
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(func=run)


def run(args):
    path = write_report(args.runs, args.out)
    print(f"report: {path}")
