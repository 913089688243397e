#!/usr/bin/env bash
# Run timm's own model test suite (tests/test_models.py of a timm checkout) on the encodenet_timm CIFAR zoo.
#
# Usage: benchmarks/tools/run_timm_model_tests.sh /path/to/pytorch-image-models [extra pytest args...]
#
# Nothing from timm is copied here: pytest is pointed at the checkout's test file, and
# benchmarks/tools/timm_tests_plugin.py registers the zoo before collection and deselects every other model.
# The *installed* timm is what gets tested against (the plugin imports it first; --import-mode=importlib keeps
# the checkout off sys.path), so use a checkout at or near the installed version (`pip show timm`).
# TorchScript tests are deselected (the zoo does not support scripting); pretrained-weight tests never select
# the zoo (no weights exist). Extra arguments go to pytest, e.g. `-k backward` or `-x`.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1/tests/test_models.py" ]]; then
    echo "usage: $0 TIMM_CHECKOUT [pytest args...]  (TIMM_CHECKOUT/tests/test_models.py must exist)" >&2
    exit 2
fi
timm_dir="$(cd "$1" && pwd)"
shift
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

export PYTHONPATH="${repo_root}:${repo_root}/benchmarks/tools${PYTHONPATH:+:${PYTHONPATH}}"
export TORCH_DEVICE="${TORCH_DEVICE:-cpu}"

exec python -m pytest "${timm_dir}/tests/test_models.py" \
    -p timm_tests_plugin \
    -p no:cacheprovider \
    --import-mode=importlib \
    -k "not torchscript" \
    -W "ignore::pytest.PytestUnknownMarkWarning" \
    -rs \
    "$@"
