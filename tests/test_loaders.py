"""encodenet_timm.loaders: seeded re-orderings (the sharded ones are tested in test_distributed.py)."""
import torch
from torch.utils.data import DataLoader, TensorDataset

from encodenet_timm.loaders import make_loader, seeded_loader


def test_seeded_loader_order_repeats():
    ds = TensorDataset(torch.arange(50).float()[:, None], torch.zeros(50, dtype=torch.long))
    like = DataLoader(ds, batch_size=7)
    a = [b[0].flatten().tolist() for b in make_loader(ds, like, shuffle=True, seed=1)]
    b = [b[0].flatten().tolist() for b in make_loader(ds, like, shuffle=True, seed=1)]
    c = [b[0].flatten().tolist() for b in make_loader(ds, like, shuffle=True, seed=2)]
    assert a == b != c and len(a[0]) == 7


def _order(loader):
    return [x.flatten().tolist() for x, _ in loader]


def test_seeded_loader_shuffles_by_its_seed_only_when_asked():
    ds = TensorDataset(torch.arange(20).float()[:, None], torch.zeros(20, dtype=torch.long))
    assert _order(seeded_loader(ds, batch_size=5, shuffle=True, seed=1)) == _order(
        seeded_loader(ds, batch_size=5, shuffle=True, seed=1))
    assert _order(seeded_loader(ds, batch_size=5)) == [[float(i) for i in range(j, j + 5)] for j in range(0, 20, 5)]
    assert seeded_loader(None, batch_size=5) is None
