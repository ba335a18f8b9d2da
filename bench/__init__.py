"""Benchmarks of genseg-fed: one command per study (see docs/results.md).

python bench/accuracy.py --quick          # methods x N x seeds, per-site / held-out Dice, paired CIs
python bench/data_efficiency.py --quick   # Dice against N and the data-efficiency factor
python bench/privacy.py --quick           # genseg at per-site epsilon 1, 3, 8, inf
python bench/cost.py --quick              # s / iteration, memory, bytes per round, scaling with sites
python bench/tune.py --quick              # level-III defaults swept on an inner validation split
python bench/crosscheck.py                # in-process transport vs `genseg-fed simulate`: same weights
"""
