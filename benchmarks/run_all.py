"""Run every benchmark in this folder (``make bench``); each writes benchmarks/results/*.json.
Then benchmarks/report.py turns the results into docs/benchmarks.md's tables and figures and the README's headline."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# each script with its defaults, and the hierarchical all-reduce once more on 4 workers per node
# (its 2 x 2 ceiling is 1.5x: results/hierarchy_4.json)
runs = [[script.name] for script in sorted(HERE.glob("bench_*.py"))]
runs.append(["bench_hierarchy.py", "--per-node", "4"])
for name, *args in runs:
    print(f"== {' '.join([name, *args])}", flush=True)
    subprocess.run([sys.executable, str(HERE / name), *args], check=True)

subprocess.run([sys.executable, str(HERE / "report.py")], check=True)
