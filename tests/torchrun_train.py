"""Train with the notebook's own code, on one process or many (torchrun), without Jupyter.

    python tests/torchrun_train.py --profile imagenet64 --set data_root=/data/imagenet64
    torchrun --nproc_per_node=8 tests/torchrun_train.py --profile imagenet64 --set batch_size=128

Every rank trains on its shard of the memmapped data and extracts the k-NN features of its share of
the images; rank 0 alone gathers them and votes (only it holds the memory bank), logs and writes
checkpoints. NCCL on GPUs, gloo on CPUs.
`--set key=value` overrides Config fields (values as JSON or Python literals: nbloader.parse_overrides).
"""
import argparse
import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbloader import check_at_least, load_notebook, parse_overrides  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402


def load_data(nb, cfg, rank, world_size):
    """(train, val): rank 0 builds the caches and says what it read, warnings included; the others wait for
    it, then open the caches and say nothing (rank 0 has said it). They wait as long as the conversion takes
    (hours for a large folder): on a group of their own, not under the default group's timeout (10 min for
    NCCL, 30 for gloo), which would stop them partway, and every relaunch would convert from the start."""
    if world_size > 1:
        import datetime
        import torch.distributed as dist
        conversion_wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    if rank == 0:
        train_val = nb.load_datasets(cfg)
    if world_size > 1:
        dist.barrier(group=conversion_wait)
        dist.destroy_process_group(conversion_wait)
    if rank == 0:
        return train_val
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nb.load_datasets(cfg, verbose=False)


@record   # a rank's error goes to torchrun's summary, not only to its own traceback
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=os.environ.get("DINO_PROFILE", "demo"))
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="Config fields; repeated --set options add up")
    p.add_argument("--max-steps", type=int, default=None, help="stop (and checkpoint) after this many steps")
    p.add_argument("--dump-teachers", action="store_true",
                   help="every rank saves its teacher as <run>/teacher_rank<R>.pt (to compare replicas)")
    args = p.parse_args(argv)
    check_at_least(p, args, max_steps=1)
    nb = load_notebook()
    import torch
    import torch.distributed as dist
    try:
        cfg = nb.make_config(args.profile, **parse_overrides(args.set, nb.Config))
    except nb.ConfigError as error:   # one line (on each rank), not a traceback
        p.error(str(error))
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = nb.pick_device(cfg.device)
    if device.type == "cuda" and world_size > 1:   # torchrun gives each process the GPU of its LOCAL_RANK
        if device.index is not None:
            raise SystemExit(f"device={cfg.device!r}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                             f"set device: cuda (or auto) and pick the GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":   # one process: the GPU the settings name (cuda:N), else the first
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    nb.seed_everything(cfg.seed)
    try:
        train_set, val_set = load_data(nb, cfg, rank, world_size)
        trainer, _ = nb.train_dino(cfg, train_set, val_set, device, rank, world_size, max_steps=args.max_steps,
                                   progress=sys.stdout.isatty())
        if args.dump_teachers and trainer is None:
            print("--dump-teachers: the run is finished and its training checkpoints are gone: no teacher to dump")
        elif args.dump_teachers:
            path = nb.run_directory(cfg) / f"teacher_rank{rank}.pt"   # the run's own folder, maybe <run_name>-<hash>
            nb.atomic_write(path, lambda f: torch.save(trainer.teacher.state_dict(), f))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
