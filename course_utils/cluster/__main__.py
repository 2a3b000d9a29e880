"""``python -m course_utils.cluster`` (``scripts/cluster``): up, status, down, rate, run.

scripts/cluster up --nodes 2 --rate 1gbit     # two nodes, a 1 Gbit/s link each
scripts/cluster status                        # addresses, link state, bytes, processes
scripts/cluster rate 100mbit                  # slower (or 'none': no limit)
scripts/cluster run 1 -- hostname             # a command on node 1
scripts/cluster down                          # nothing left
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from course_utils import cluster as nodes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n")[0])
    p.add_argument("--name", default=nodes.NAME, help="the cluster's name (default: course)")
    sub = p.add_subparsers(dest="action", required=True)
    make = sub.add_parser("up", help="make the nodes, the switch and the links")
    make.add_argument("--nodes", type=int, default=2)
    make.add_argument("--rate", default="1gbit", help="link rate in tc's units, or 'none'")
    sub.add_parser("status", help="nodes, addresses, link state, bytes on each link")
    sub.add_parser("down", help="remove every namespace, link and process of the cluster")
    rate = sub.add_parser("rate", help="change the link rate of the running cluster")
    rate.add_argument("rate", help="in tc's units (1gbit, 100mbit) or 'none'")
    run = sub.add_parser("run", help="run a command on a node: run NODE -- COMMAND...")
    run.add_argument("node", type=int)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    return p


def _rate(text: str) -> str | None:
    return None if text.lower() in ("none", "0", "") else text


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _act(args)
    except (nodes.ClusterError, ValueError) as err:
        print(f"cluster: {err}", file=sys.stderr)
        return 1


def _act(args) -> int:
    problem = nodes.unavailable()
    if problem:
        print(f"cluster: {problem}", file=sys.stderr)
        return 2
    if args.action == "up":
        start = time.perf_counter()
        made = nodes.up(nodes.Cluster(args.name, args.nodes, _rate(args.rate)))
        took = time.perf_counter() - start
        print(
            f"cluster {made.name}: {made.nodes} nodes, link {made.rate or 'unlimited'}, up in {took:.2f} s"
        )
        for i in range(made.nodes):
            print(f"  {made.hostname(i)}  {made.address(i)}  (namespace {made.namespace(i)})")
        return 0
    if args.action == "down":
        start = time.perf_counter()
        gone = nodes.down(args.name)
        took = time.perf_counter() - start
        print(
            f"cluster {args.name}: removed {len(gone)} namespaces in {took:.2f} s"
            if gone
            else f"cluster {args.name}: not up"
        )
        return 0
    found = nodes.find(args.name)
    if found is None:
        print(f"cluster {args.name}: not up (scripts/cluster up)", file=sys.stderr)
        return 1
    if args.action == "status":
        print(json.dumps(nodes.status(args.name), indent=2))
        return 0
    if args.action == "rate":
        changed = nodes.set_rate(found, _rate(args.rate))
        print(f"cluster {changed.name}: link {changed.rate or 'unlimited'}")
        return 0
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv or not 0 <= args.node < found.nodes:
        print(f"cluster: run NODE -- COMMAND, NODE in 0..{found.nodes - 1}", file=sys.stderr)
        return 2
    return nodes.spawn(found, args.node, argv).wait()


if __name__ == "__main__":
    sys.exit(main())
