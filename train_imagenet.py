"""Train a ResNet on ImageNet (WebDataset shards), from one CPU to many GPUs and nodes.

Shards come from `make-shards` (see README, "Prepare ImageNet"). One command line serves every topology;
Accelerate decides the devices and processes:

    # CPU, one process (the README's demo does this on a small real dataset)
    accelerate launch --cpu train_imagenet.py --config launch/configs/digits_demo.yaml

    # CPU, two processes (gloo): accelerate's --cpu flag would route this to mpirun, so ask for its
    # multi-process launcher instead; without a GPU the trainer falls back to the CPU and gloo by itself
    accelerate launch --multi_gpu --num_processes 2 train_imagenet.py --config launch/configs/digits_demo.yaml

    # one GPU
    accelerate launch --config_file launch/accelerate/1gpu.yaml train_imagenet.py \
        --config launch/configs/resnet50_90ep.yaml --data-dir /data/imagenet-shards

    # one node, 8 GPUs
    accelerate launch --config_file launch/accelerate/1node_8gpu.yaml train_imagenet.py \
        --config launch/configs/resnet50_90ep.yaml --data-dir /data/imagenet-shards

    # SLURM, several nodes (edit the lines marked EDIT first)
    sbatch --nodes 4 launch/slurm/multi_node.sbatch --config launch/configs/resnet50_90ep.yaml \
        --data-dir /data/imagenet-shards

    # plain torchrun, or `srun python train_imagenet.py ...` with one task per GPU, work as well

When the loader workers cannot keep up (the trainer warns), `--decode device` decodes each batch's JPEGs on the
GPU (nvJPEG) instead: README, "Decoding on the GPU".

Every option can come from a YAML recipe (`--config`); flags on the command line override it. The resolved
configuration, library versions, world size and git revision are written into `--output-dir`, beside the
checkpoints, TensorBoard events (`tensorboard --logdir <output-dir>`) and `metrics.jsonl`.

`--resume auto` continues from the newest complete checkpoint, mid-epoch included, also on another number of
processes, `--workers` or `--batch-size` (the epoch goes on with the samples it has not used); one that fails
its checksums or cannot be loaded is named, renamed `step-N.unloadable` and the one before it used; one written
for another network or optimizer stops the run with one line, nothing renamed. SIGUSR1, SIGTERM or Ctrl-C makes
every rank stop at the same step boundary, write one checkpoint and exit with code 75 (requeue me). A run
directory holds one run: a second one into it is refused (`--resume auto`, or `--overwrite` to replace it). A
loss that stays NaN/inf (`--max-nonfinite-steps`) or a full disk stops the run with exit code 1 and never costs
the last good checkpoint. What survives what, and the test that shows it: README, "Reliability" and "Resume".
"""

from __future__ import annotations

import sys
from pathlib import Path

from data import DataError
from data.errors import DataOutage
from engine import console
from engine.batches import (Batches, DeviceBatch, ResolutionSchedule, open_train_loader, open_val_loader,
                            settle_workers, shard_reads, steps_per_epoch)
from engine.checkpoints import Progress
from engine.config import parse_config
from engine.continuation import continue_epoch
from engine.options import Config
from engine.evaluation import check_count, evaluate, load_weights
from engine.monitor import Monitor
from engine.recipe import (Learner, ScheduleClock, build_criterion, build_ema, build_network, build_optimizer,
                           build_scheduler, network_card, peak_lr)
from engine.resume import Fit, resume_from
from engine.rundir import claim_run_dir
from engine.runtime import (adopt_slurm_ranks, allow_a_graph_per_size, bare, before_exit, make_accelerator,
                            seed_each_rank, write_run_info)
from engine.stops import StopRequest, exit_for_outage
from engine.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, description=__doc__.split("\n\n")[0])
    adopt_slurm_ranks()
    stop = StopRequest()  # first: a SIGTERM during start-up would otherwise kill the process
    accelerator = make_accelerator(cfg.runtime, grad_accum=cfg.optim.grad_accum, seed=cfg.run.seed)
    cfg = settle_workers(cfg)  # the cores per process are known once the ranks are
    try:
        code = evaluate_only(cfg, accelerator) if cfg.run.evaluate else train(cfg, accelerator, stop)
    except DataOutage as e:  # the shard store is down before training began: nothing to save, requeue
        code = exit_for_outage(Path(cfg.run.output_dir), str(e), accelerator.is_main_process)
    except DataError as e:  # an unreadable shard, too many corrupt samples: one line naming it
        console.fatal(str(e))
    accelerator.end_training()
    return code


def train(cfg: Config, accelerator, stop: StopRequest) -> int:
    out, world = Path(cfg.run.output_dir), accelerator.num_processes
    lock = claim_run_dir(cfg.run, accelerator)  # locked for this run, and not another run's directory
    # data: this rank's uint8 batches, and the way they are normalised (and mixed) on the device
    resolution = ResolutionSchedule(cfg.resolution, cfg.data.image_size, cfg.schedule.epochs)
    if cfg.runtime.compile:
        allow_a_graph_per_size(len(resolution.sizes()))
    reads = shard_reads(cfg.data)  # remote shards: retries, and their count, shared by both loaders
    loader = open_train_loader(cfg.data, cfg.augment, resolution, batch_size=cfg.optim.batch_size,
                               seed=cfg.run.seed, accelerator=accelerator, reads=reads)
    steps = steps_per_epoch(loader, grad_accum=cfg.optim.grad_accum, world_size=world)
    prep = DeviceBatch(cfg.augment, accelerator.device, loader.num_classes, channels_last=cfg.model.channels_last,
                       label_smoothing=cfg.optim.label_smoothing)
    val = open_val_loader(cfg.data, cfg.evaluation, batch_size=cfg.optim.batch_size,
                          interpolation=cfg.augment.interpolation, accelerator=accelerator, reads=reads)
    batches = Batches(loader, val, prep, steps, resolution)
    # what is trained and how, wrapped by Accelerate (DDP, autocast, loss scaling)
    model = build_network(cfg.model, loader.num_classes, world)
    optimizer, clock = build_optimizer(cfg.optim, model, world), ScheduleClock()
    scheduler = build_scheduler(cfg.schedule, optimizer, steps, clock)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = build_ema(cfg.optim.ema_decay, bare(accelerator, model))
    seed_each_rank(cfg.run.seed, accelerator.process_index)  # the same weights everywhere; augmentation per rank
    criterion = build_criterion(cfg.optim.label_smoothing, mixes=cfg.augment.mixes)
    learner = Learner(model, optimizer, scheduler, ema, criterion, network_card(cfg.model, loader.num_classes), clock)
    # where to start: the newest good checkpoint that fits this run, or step 0; its epoch under this layout
    fit = Fit(cfg.flat(), learner.card, out)
    progress = resume_from(accelerator, cfg.run.resume, out, learner, fit) if cfg.run.resume else Progress()
    continue_epoch(progress, loader)
    write_run_info(cfg, accelerator, out, loader)
    monitor = Monitor(out, enabled=accelerator.is_main_process, resume_step=progress.global_step,
                      hparams=cfg.flat(), workers=cfg.data.workers, log_every=cfg.run.log_every)
    console.say(f"{cfg.model.arch}: {steps} steps/epoch x {cfg.schedule.epochs} epochs, global batch "
                f"{cfg.optim.batch_size * world * cfg.optim.grad_accum}, peak LR {peak_lr(cfg.optim, world):.4g} "
                f"(--lr {cfg.optim.lr:g} per 256 images, {cfg.optim.lr_scaling}), {world} process(es) on "
                f"{accelerator.device.type}")
    # the loop; then the final evaluation and export, or a checkpoint and the requeue code
    trainer = Trainer(accelerator, learner, batches, monitor, progress, stop, cfg)
    code = trainer.finish(trainer.fit())
    if lock is not None:
        lock.release()
    return code


def evaluate_only(cfg: Config, accelerator) -> int:
    """--evaluate: a model.pt or a checkpoint directory, on the validation split (no training loader)."""
    val = open_val_loader(cfg.data, cfg.evaluation, batch_size=cfg.optim.batch_size,
                          interpolation=cfg.augment.interpolation, accelerator=accelerator,
                          reads=shard_reads(cfg.data))
    model = build_network(cfg.model, val.num_classes, accelerator.num_processes).to(accelerator.device)
    load_weights(cfg.run.evaluate, model, accelerator.device)
    prep = DeviceBatch(cfg.augment, accelerator.device, val.num_classes, channels_last=cfg.model.channels_last,
                       label_smoothing=0.0)
    result = evaluate(model, val, prep, accelerator, flip=cfg.evaluation.eval_flip)
    check_count(result, val)
    console.say(f"final top1={result['top1']:.2f} top5={result['top5']:.2f} images={result['images']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        before_exit()  # gloo's threads let go of their tensors, and Python skips its last garbage collection
