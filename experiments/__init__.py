"""Experiments on top of the library (not part of the installed package): the CPU ablation
(`python -m experiments.ablate`) and its larger-scale run (`python experiments/ablation_scale.py`),
run from the repository root."""
