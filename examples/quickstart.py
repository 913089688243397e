"""Will EncodeNet help? End to end on real data that needs no download: scikit-learn's handwritten digits.

    python examples/quickstart.py                 # one seed, about 3 minutes on 2 CPU cores
    python examples/quickstart.py --seeds 0 1 2   # a paired test over three seeds

Trains a small timm ResNet on the digits (resized to 32x32) as the baseline, runs EncodeNet from it
(representatives -> converting autoencoder -> transfer -> fine-tune), trains the `continued` control
(the baseline trained on for the same extra FLOPs), and prints all three test accuracies and the verdict.
"""
import argparse
import logging

import timm
import torch
from torch.utils.data import DataLoader, Subset

from encodenet_timm import EncodeNetConfig, compare
from encodenet_timm.data import digits_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="any timm classifier name")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--baseline-epochs", type=int, default=6)
    parser.add_argument("--ae-epochs", type=int, default=3)
    parser.add_argument("--transfer-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("encodenet_timm.compare").setLevel(logging.INFO)

    train, test = digits_datasets(size=32, in_chans=3, seed=0)  # 1,347 / 450 real images
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    val, train = Subset(train, order[:200].tolist()), Subset(train, order[200:].tolist())  # 200 held out
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

    config = EncodeNetConfig(input_size=(3, 32, 32), channels_last=True, progress=False)
    config.baseline.epochs = args.baseline_epochs
    config.autoencoder.epochs = args.ae_epochs
    config.transfer.epochs = args.transfer_epochs
    config.finetune.epochs = args.finetune_epochs
    result = compare(lambda: timm.create_model(args.model, pretrained=False, num_classes=10), train_loader,
                     DataLoader(val, batch_size=256), config=config, controls=("continued",), seeds=args.seeds,
                     test_loader=DataLoader(test, batch_size=256))
    print(result.table())
    print(result.verdict)
    best = result.model()  # the most accurate row on validation, as a plain timm model of the same size
    print(f"kept: {result.best!r}, {sum(p.numel() for p in best.parameters()):,} parameters, like the baseline")


if __name__ == "__main__":
    main()
