"""`python -m featuredb.indexer ...` is `featuredb index ...`, and the entry point for torchrun:

    torchrun --nproc-per-node 8 -m featuredb.indexer --model ... --coder ... --corpus ... --db ...

splits the run across the 8 processes (see featuredb/indexer/distributed.py and docs/distributed.md);
`--coder-groups G` makes each of G groups of them hold only some of the coders.
"""

import sys

from featuredb.cli import main

if __name__ == "__main__":
    main(["index", *sys.argv[1:]], prog_name="featuredb")
