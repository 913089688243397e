"""Run by tests/test_distributed.py under torchrun: rank 1's loss turns NaN at one step of the baseline.

Every rank writes what it raised to OUT/rank<R>.json before exiting.
"""
import json
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from timm.task import ClassificationTask
from torch.utils.data import DataLoader, Subset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper, NonFiniteLossError
from encodenet_timm.data import digits_datasets

NAN_STEP = 3


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    forward, calls = ClassificationTask.forward, [0]

    def poisoned(self, input, target):  # rank 1 only: a NaN loss at step NAN_STEP
        result = forward(self, input, target)
        calls[0] += 1
        if rank == 1 and calls[0] == NAN_STEP + 1:
            result["loss"] = result["loss"] * float("nan")
        return result

    ClassificationTask.forward = poisoned
    train, _ = digits_datasets(size=32, in_chans=3, seed=0)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    wrapper = EncodeNetWrapper(model, EncodeNetConfig(progress=False).override({"baseline.epochs": 1}))
    record = {"rank": rank, "raised": None}
    try:
        wrapper.fit_baseline(DataLoader(Subset(train, range(256)), batch_size=16, shuffle=True))
    except NonFiniteLossError as e:
        record.update(raised=type(e).__name__, stage=e.stage, epoch=e.epoch, step=e.step)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
