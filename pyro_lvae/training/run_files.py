"""The files of a run directory, named once for every module that reads or writes them.

A run directory written by ``pyro-lvae train`` holds:

* ``config.json`` — the :class:`~pyro_lvae.config.ExperimentConfig` of the run;
* ``metrics.jsonl`` — one line per epoch (β, the warm-up objective, seconds, periodic evaluations);
* ``checkpoint.pt`` and ``checkpoint.prev.pt`` — the newest checkpoint and the one before it;
* ``results.json`` — the final evaluation;
* ``per_example.npz`` — that evaluation's ELBO and L_K of each test example, for paired comparisons;
* ``train.log`` — the log of a run started by ``pyro-lvae sweep``.
"""

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
RESULTS_NAME = "results.json"
PER_EXAMPLE_NAME = "per_example.npz"
LOG_NAME = "train.log"
