"""lit_dprl: differentially private alignment of language models with RL, as Lightning modules."""
