"""Epsilon from pfl-research's accountants for the settings of a JSON file, to set beside
fedjax_fm.privacy's (RESULTS.md, "Privacy, compression and robustness"). Run it with pfl
installed (in its own environment: pfl pins dp-accounting < 0.6 and an older absl-py):

  python -m venv --system-site-packages /tmp/pflvenv
  /tmp/pflvenv/bin/pip install pfl==0.6.0 -c <(echo torch==2.13.0)
  python benchmarks/privacy_experiments.py accountants --out results/privacy     # ours + settings
  /tmp/pflvenv/bin/python benchmarks/pfl_epsilon.py results/privacy/accountants.json

It reads ``[{"noise_multiplier", "sampling_rate", "rounds", "delta", ...}, ...]`` and adds
``pfl_rdp`` and ``pfl_pld`` to each row (Gaussian mechanism, Poisson sampling, add-or-remove).
"""

import json
import sys

from pfl.privacy import privacy_accountant as pa


def main(path):
  rows = json.load(open(path))
  for r in rows:
    common = dict(num_compositions=r["rounds"], sampling_probability=r["sampling_rate"],
                  mechanism="gaussian", delta=r["delta"], noise_parameter=r["noise_multiplier"])
    r["pfl_rdp"] = pa.RDPPrivacyAccountant(**common).epsilon
    r["pfl_pld"] = pa.PLDPrivacyAccountant(**common).epsilon
    print(r, flush=True)
  json.dump(rows, open(path, "w"), indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
