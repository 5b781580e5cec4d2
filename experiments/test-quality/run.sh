#!/usr/bin/env bash
# Coverage and mutation testing of the package, on demand: too slow for CI. From the
# repository root, with the test extra installed in the active environment:
#
#   bash experiments/test-quality/run.sh coverage   # about 10 min on 2 cores
#   bash experiments/test-quality/run.sh mutation   # about an hour on 2 cores
#
# coverage: the whole test suite under pytest-cov (line and branch), summarized per
#   module into coverage.md here (summarize.py).
# mutation: mutmut 3 on the core modules, with the tests of the model core, inference
#   and steps, in a throwaway clone of HEAD (mutmut writes a mutants/ tree); every
#   mutant's status goes to mutants.txt here and the counts to mutation.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
what="${1:?usage: run.sh coverage|mutation}"
export MPLBACKEND=Agg

case "$what" in
coverage)
  cd "$repo"
  python -m pytest -q -p no:cacheprovider --cov=pyro_lvae --cov-branch --cov-report="json:$here/coverage.json"
  python "$here/summarize.py" coverage "$here/coverage.json" > "$here/coverage.md"
  rm "$here/coverage.json"
  ;;
mutation)
  work="$(mktemp -d)/repo"
  git clone -q "$repo" "$work"
  cat "$here/mutmut.toml" >> "$work/pyproject.toml"
  cd "$work"
  OMP_NUM_THREADS=1 mutmut run --max-children "$(nproc)" > /dev/null 2>&1 || true
  mutmut results --all true > "$here/mutants.txt"
  python "$here/summarize.py" mutation "$here/mutants.txt" > "$here/mutation.md"
  rm -rf "$(dirname "$work")"
  ;;
*)
  echo "usage: run.sh coverage|mutation" >&2
  exit 2
  ;;
esac
