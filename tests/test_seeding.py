import random

import numpy as np
import torch

from encodenet_timm.seeding import epoch_seed, rng_state, seed_everything, set_rng_state


def test_epoch_seed_depends_on_seed_and_epoch_only():
    assert epoch_seed(0, 1) == epoch_seed(0, 1) != epoch_seed(0, 2) != epoch_seed(1, 2)
    assert 0 <= epoch_seed(-5, 0) < 2 ** 63


def test_rng_state_round_trips_python_numpy_and_torch():
    seed_everything(3)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(4)  # move every generator elsewhere
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
