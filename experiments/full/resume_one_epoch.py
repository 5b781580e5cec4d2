"""Resume a copy of a paper-length run for one epoch (no final evaluation); print a digest.

Run it on two copies of the same checkpoint, once with the code the run was started with
and once with the current code, to check that the run resumes across a change of the
code: the parameters' sha256 and the epoch's metrics must be equal.

    PYTHONPATH=<checkout> OMP_NUM_THREADS=1 python resume_one_epoch.py COPY_OF_RUN_DIR lvae-bn-wu-5
"""

import hashlib
import json
import sys

from pyro_lvae.checkpoint import load_checkpoint
from pyro_lvae.presets import get_preset  # the flat path: old code has it, new code keeps it as an alias
from pyro_lvae.training import train

run_dir, preset = sys.argv[1], sys.argv[2]
done = load_checkpoint(run_dir)["epoch"]
cfg = get_preset(preset).replace(eval_every=50, epochs=done + 1)
train(cfg, out_dir=run_dir, resume=True, final_evaluation=False, progress=False, download=False)
ck = load_checkpoint(run_dir)
h = hashlib.sha256()
for part in ("model", "guide"):
    for k, v in sorted(ck[part].items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
line = json.loads(open(f"{run_dir}/metrics.jsonl").read().splitlines()[-1])
digest = {"epoch": ck["epoch"], "params_sha256": h.hexdigest(), "train_objective": line["train_objective"]}
print(json.dumps(digest | {"test_elbo": line.get("test_elbo")}))
