"""Run every benchmark in this folder (``make bench``); each writes benchmarks/results/*.json.
Then benchmarks/report.py turns the results into docs/benchmarks.md's tables and figures and the README's headline."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in sorted(HERE.glob("bench_*.py")):
    print(f"== {script.name}", flush=True)
    subprocess.run([sys.executable, str(script)], check=True)

subprocess.run([sys.executable, str(HERE / "report.py")], check=True)
