"""The privacy-utility table: ``python sweep.py --config configs/sweep/imdb_cpu.yaml`` (see ``--help``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lit_dprl.sweep import main

if __name__ == "__main__":
    main()
