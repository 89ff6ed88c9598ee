"""Optuna (TPE) + ASHA search over LMD's scheduler, mask ratios, depths and learning rate on Ray Tune.

    python tune/search.py                                      # embedded defaults: local Ray, CPU
    python tune/search.py --samples 64 --budget 20000 --preset base_p4 --resolution 224 \
        --address auto --gpus-per-trial 1 --storage /shared/lmd-tune
    optuna-dashboard runs/tune/search/optuna.journal           # inspect the study

Implementation: lmd/experiments/search.py.
"""

import sys

from lmd.experiments.search import main

if __name__ == "__main__":
    sys.exit(main())
