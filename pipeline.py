"""Run the whole pipeline: ``python pipeline.py --config configs/pipeline/imdb_demo.yaml`` (see ``--help``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lit_dprl.pipeline import main

if __name__ == "__main__":
    main()
