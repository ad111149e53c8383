"""Train one stage: ``python train.py fit --config configs/tiny/sft.yaml`` (see ``--help``)."""

from lit_dprl.cli import main

if __name__ == "__main__":
    main()
