"""EncodeNet under torchrun: every stage data-parallel, on real digits (no download).

    torchrun --standalone --nproc_per_node 2 examples/distributed_fit.py --out runs/ddp

Each rank gets ``--batch-size`` images per step (the global batch is nproc x batch size). On GPUs
use NCCL (chosen when CUDA is present); on CPU gloo. Rank 0 writes model.safetensors,
representatives.safetensors and history.json to --out; with --all-ranks every rank writes its
weights (rank<R>.safetensors), to check that the ranks stay in sync.

With --run-dir the run is checkpointed there (every --checkpoint-every steps too), and a launch that
finds a run there continues it: ``torchrun --max-restarts 1`` survives a rank that dies.
"""
import argparse
import json
import os
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper, distributed
from encodenet_timm.data import digits_datasets
from encodenet_timm.data.device import to_device_dataset
from encodenet_timm.device_data import device_collate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--train-size", type=int, default=1024, help="first N training digits")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every stage")
    p.add_argument("--feature-store", default=None, help="directory for on-disk features (shared by the ranks)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--all-ranks", action="store_true")
    p.add_argument("--device-data", action="store_true", help="hold the digits on the device (device_data.py)")
    p.add_argument("--run-dir", default=None, help="checkpoint the run there; continue the run found there")
    p.add_argument("--checkpoint-every", type=int, default=0, help="with --run-dir: also every N steps")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    # torchrun sets rank and world; NCCL with CUDA, else gloo; a collective waits at most $ENCODENET_DIST_TIMEOUT s
    distributed.init_group()
    try:
        train, _ = digits_datasets(size=32, in_chans=3, seed=0)
        train = Subset(train, range(min(args.train_size, len(train))))
        if args.device_data:  # the same images, batched on the device; DistributedSampler shards it unchanged
            train = to_device_dataset(train, distributed.local_device("cuda" if torch.cuda.is_available() else "cpu"))
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                            collate_fn=device_collate if args.device_data else None)
        # a small ConvNeXt: LayerNorm only, so a rank's batch statistics never enter the result (its decoder
        # needs decoder.max_flops_ratio 2: the encoder is tiny)
        torch.manual_seed(0)
        model = timm.create_model("convnext_atto", pretrained=False, num_classes=10, depths=(1, 1, 1, 1),
                                  dims=(16, 32, 64, 128))
        config = EncodeNetConfig(progress=False).override({
            "baseline.epochs": args.epochs, "autoencoder.epochs": args.epochs, "transfer.epochs": args.epochs,
            "finetune.epochs": args.epochs, "representatives.clusters_per_class": 3,
            "representatives.feature_store": args.feature_store, "decoder.max_flops_ratio": 2.0,
            # GroupNorm in the decoder: no batch statistics, so the result does not depend on how the
            # global batch is split over ranks (BatchNorm, the default, sees per-rank statistics)
            "decoder.norm": "group"})
        wrapper = EncodeNetWrapper(model, config)
        run_dir = Path(args.run_dir) if args.run_dir else None
        resume = [run_dir is not None and (run_dir / "run.json").is_file()]  # a restart, or a relaunch
        dist.broadcast_object_list(resume, src=0)  # rank 0's answer: it may write run.json while others look
        resume = resume[0]
        history = wrapper.fit(loader, run_dir=run_dir, resume=resume, checkpoint_every=args.checkpoint_every)
        rank, out = dist.get_rank(), Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous() for k, v in wrapper.export().state_dict().items()}
        if args.all_ranks:
            save_file(weights, str(out / f"rank{rank}.safetensors"))
        if rank == 0:
            save_file(weights, str(out / "model.safetensors"))
            wrapper.representatives.save(out / "representatives.safetensors")
            (out / "history.json").write_text(json.dumps({"world_size": dist.get_world_size(),
                                                          "pid": os.getpid(), "history": history}, indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
