#!/usr/bin/env python
"""cat_titan training entry point.

    python train.py --config configs/debug_cat_adaptive.yaml [key.path=value ...]
    torchrun --nproc_per_node=N train.py --config configs/cat_150m.yaml

Exit status: 0 finished, 2 bad configuration, 75 preempted after saving (requeue).
"""

import sys

from cat_titan.train.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
