#!/usr/bin/env bash
# Issue #15's GPU rows, ready to run on a CUDA machine (H100/H200) from the repository root, with the
# package installed (pip install -c constraints.txt -e ".[dev]") and cifar10-jpeg.zip in $DATA.
# Not run yet: no GPU was lent to the task that wrote it. Each step writes under benchmarks/results/.
set -euo pipefail
DATA=${DATA:-/work/shared/data}
# 0. FAISS on the GPU: replace faiss-cpu with PyPI's faiss-gpu 1.15.1 (CUDA 12 runtime wheels)
if [ "${SWAP_FAISS:-1}" = 1 ]; then
  pip uninstall -y faiss-cpu && pip install -c constraints.txt faiss-gpu
  python -c "import faiss; print('faiss', faiss.__version__, 'GPUs', faiss.get_num_gpus())"
fi
# 1. GPU tests (AMP, channels_last, FAISS GPU vs CPU, device data on CUDA)
python -m pytest -q -m gpu tests/
# 2. loader img/s (per-sample vs device) + training img/s + baseline/autoencoder/transfer epochs, both paths
#    (--stage-epochs 5: each stage's seconds are the median of epochs 2-5; training img/s is also measured
#    with a host read of the losses every step, against the loop's default of every 16)
python benchmarks/data_path.py --device cuda --data-dir "$DATA" --batch-size 512 --stage-epochs 5
# 3. where the autoencoder epoch goes on the GPU (torch.profiler, full training set)
python benchmarks/tools/profile_autoencoder.py --device cuda --data-dir "$DATA" --images 50000 --batch-size 512
# 4. FAISS k-means GPU vs CPU (and AMP/channels_last/compile rows at 32x32)
python benchmarks/tools/gpu_paths.py --device cuda --model resnet20_cifar --img-size 32 --batch-size 512 --steps 50
# 5. the gpu profile of benchmarks/cifar.py, 3 seeds (device data path by default on CUDA)
python benchmarks/cifar.py --dataset cifar10-jpeg --data-dir "$DATA" --profile gpu --seeds 0 1 2 --device cuda
