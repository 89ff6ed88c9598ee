"""Experiments on Ray Tune: the paper's ablation and hyperparameter search (scripts live in tune/)."""
