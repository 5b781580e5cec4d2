#!/usr/bin/env bash
# Run here, before a call on a lent GPU machine: builds the two ignored folders that the call
# carries (bench/device/README.md). The machine's image has torch with CUDA but not Pyro, and
# reaches no package registry.
#   .whl      the wheels of pyro-ppl 1.9.2, pyro-api 0.1.2 and opt_einsum 3.4.0
#   .devdata  MNIST, binarized MNIST and OMNIGLOT-28 from ../shared/data (Fashion-MNIST, 30 MiB,
#             would not fit in the 64 MiB a call carries; its tests skip or fail there)
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl .devdata
python3 -m pip download -q --no-deps -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2 opt_einsum==3.4.0
mkdir .devdata
cp -r ../shared/data/MNIST ../shared/data/binarized_mnist ../shared/data/omniglot28 .devdata/
chmod -R u+w .devdata
du -sh .whl .devdata
