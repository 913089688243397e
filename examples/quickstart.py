"""EncodeNet end to end on real data that needs no download: scikit-learn's handwritten digits.

    python examples/quickstart.py

Trains a small timm ResNet on the digits (resized to 32x32), then runs EncodeNet from it
(representatives -> converting autoencoder -> transfer) and prints both test accuracies.
About 2-3 minutes on 2 CPU cores.
"""
import argparse
import logging
import time

import timm
import torch
from torch.utils.data import DataLoader

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.data import digits_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="any timm classifier name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-epochs", type=int, default=6)
    parser.add_argument("--ae-epochs", type=int, default=3)
    parser.add_argument("--transfer-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)

    train, test = digits_datasets(size=32, in_chans=3, seed=args.seed)  # 1,347 / 450 real images
    train_loader = DataLoader(train, batch_size=64, shuffle=True)
    test_loader = DataLoader(test, batch_size=256)

    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    config = EncodeNetConfig(seed=args.seed, input_size=(3, 32, 32), channels_last=True, progress=False)
    config.baseline.epochs = args.baseline_epochs
    config.autoencoder.epochs = args.ae_epochs
    config.transfer.epochs = args.transfer_epochs
    config.finetune.epochs = args.finetune_epochs
    wrapper = EncodeNetWrapper(model, config)
    flops = wrapper.flops()
    print(f"{args.model}: decoder traced via {wrapper.decoder.trace_path}, "
          f"decoder/encoder FLOPs = {flops['ratio']:.2f}")

    start = time.perf_counter()
    wrapper.fit_baseline(train_loader)
    baseline = wrapper.evaluate(test_loader)["accuracy"]
    wrapper.select_representatives(train_loader)
    wrapper.fit_autoencoder(train_loader)
    wrapper.fit_transfer(train_loader)
    if config.finetune.epochs:
        wrapper.fit_finetune(train_loader)
    encodenet = wrapper.evaluate(test_loader)["accuracy"]
    plain = wrapper.export()  # a plain timm model, same class and size as `model`

    print(f"test accuracy  baseline: {baseline:.4f}   EncodeNet: {encodenet:.4f}   "
          f"({sum(p.numel() for p in plain.parameters()):,} parameters both, "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
