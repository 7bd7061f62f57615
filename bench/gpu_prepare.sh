#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh needs on a lent GPU machine (issue 15), in .gpu/ (ignored by
# git through .git/info/exclude): the CUDA build of `dino` and `examples/bench` packed into one
# archive (scripts/build_cuda.sh --pack), and the first 4000 training and 1000 test images of
# Fashion-MNIST as IDX files (2 MB instead of 31). Together about 47 MB, so one transfer carries
# them with the repository. Then, on the device, with `.gpu` carried:
#   mkdir -p /tmp/b && tar -xJf .gpu/dino-gpu.tar.xz -C /tmp/b && bash bench/gpu_check.sh cuda /tmp/b .gpu/data
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/data
fashion=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
python3 - "$fashion" .gpu/data <<'PY'
import gzip, struct, sys
src, dst = sys.argv[1], sys.argv[2]
for split, count in (("train", 4000), ("t10k", 1000)):
    images = gzip.open(f"{src}/{split}-images-idx3-ubyte.gz").read()
    labels = gzip.open(f"{src}/{split}-labels-idx1-ubyte.gz").read()
    rows, cols = struct.unpack(">II", images[8:16])
    with gzip.open(f"{dst}/{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, count, rows, cols) + images[16:16 + count * rows * cols])
    with gzip.open(f"{dst}/{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, count) + labels[8:8 + count])
PY
scripts/build_cuda.sh --pack .gpu
du -sh .gpu
