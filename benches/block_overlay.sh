#!/usr/bin/env bash
# The speculative disk's level operations (issue 14): rollback and fold
# times for 10 / 1,000 / 100,000 granules written on 1 GiB and 16 GiB
# sparse images, as a Markdown table. The images go to $SPECVM_BENCH_DIR
# (default: the temporary folder) and are removed afterwards; the 100,000
# granule rows hold about 400 MiB of overlay in memory and write as much to
# the image at the outermost fold.
# Usage: benches/block_overlay.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
exec cargo bench -p vmm --bench block_overlay
