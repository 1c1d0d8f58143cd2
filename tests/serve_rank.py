"""What torchrun runs as each rank in test_cluster.py's config test: `streamrnn serve
ARGS`, where rank 1 also gets `--set $RANK1_SET` (a rank started with another config)."""
import os
import sys

from streamrnn.cli import main

extra = ["--set", os.environ["RANK1_SET"]] if os.environ.get("RANK") == "1" else []
sys.exit(main(["serve", *sys.argv[1:], *extra]))
