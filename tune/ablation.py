"""The LMD paper's ablation on Ray Tune (variants x seeds, fixed budget, time-to-target).

    python tune/ablation.py                                   # embedded defaults: local Ray, CPU
    python tune/ablation.py --resume                          # continue an interrupted run
    python tune/ablation.py --address auto --gpus-per-trial 1 --preset base_p4 --resolution 224 \
        --dataset /data/imagenet --budget 20000 --seeds 3 --storage s3://YOUR-BUCKET/lmd-ray

Writes <storage>/<name>/results.parquet (one row per trial x report) and summary.json, and prints
the summary table. Implementation: lmd/experiments/ablation.py.
"""

import sys

from lmd.experiments.ablation import main

if __name__ == "__main__":
    sys.exit(main())
