"""The fuzzing suite (tests/test_fuzz.py) with many more examples than the test run's 100 per property, and random
rather than fixed seeds: recipe and plan YAML, any text as either, checkpoint files and their tensors, ONNX files
for `check` and `bench --onnx`, image files. Prints how many inputs each property tried and what failed, if anything.

    python tools/fuzz.py                  # 2,000 examples per property: about 2 minutes on 2 cores
    python tools/fuzz.py --examples 20000 # longer
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2000, help="examples per property (default 2000)")
    args = p.parse_args()
    env = {**os.environ, "POMQ_FUZZ_PROFILE": "long", "POMQ_FUZZ_EXAMPLES": str(args.examples)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fuzz.py"),
           "--hypothesis-show-statistics"]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
