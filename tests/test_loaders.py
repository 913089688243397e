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


class _Counted(TensorDataset):
    reads = 0

    def __getitem__(self, i):
        _Counted.reads += 1
        return super().__getitem__(i)


def test_epoch_batches_skips_in_the_sampler_and_draws_the_same_order():
    """From batch 3 on: the batches iter(loader) gives from there, with its generator or with the global
    RNG (no generator), and no image read for the batches passed over."""
    from encodenet_timm.loaders import epoch_batches
    ds = _Counted(torch.arange(50).float()[:, None], torch.zeros(50, dtype=torch.long))
    for generator in (torch.Generator(), None):
        loader = DataLoader(ds, batch_size=7, shuffle=True, generator=generator)

        def seed():  # what the loop's epoch start does
            torch.manual_seed(5)
            if generator is not None:
                generator.manual_seed(5)
        seed()
        whole = _order(epoch_batches(loader))
        seed()
        _Counted.reads = 0
        rest = _order(epoch_batches(loader, 3))
        assert rest == whole[3:] and len(whole) == 8 and _Counted.reads == 50 - 3 * 7
        assert _order(epoch_batches(loader, 8)) == []  # stopped after the last step: nothing left
