"""The training loop: epochs of steps, evaluation and checkpoints between them, and how a run ends."""

from __future__ import annotations

from pathlib import Path

import torch

from data.errors import DataOutage
from data.remote import is_retried

from . import console
from .batches import Batches
from .checkpoints import (CheckpointError, Progress, checkpoint_dirs, failure_message, save_checkpoint,
                          state_bytes, step_name)
from .continuation import current_segment
from .options import STOP_CHECK_EVERY, Config
from .evaluation import check_count, check_replicas, evaluate, export_model, sync_buffers
from .faults import FAULTS
from .monitor import DataCounts, Monitor, StepMeter, progress_bar
from .recipe import Learner, peak_lr, set_schedule
from .runtime import CompileNotice, bare
from .stops import (EXIT_REQUEUE, DataWatch, NonFiniteGuard, StopReason, StopRequest, agree_to_stop,
                    exit_for_outage, unsafe_to_save)


class Trainer:
    """Runs epochs from where ``progress`` says; every rank runs the same steps and calls the same
    collectives, and the main process does the writing."""

    def __init__(self, accelerator, learner: Learner, batches: Batches, monitor: Monitor, progress: Progress,
                 stop: StopRequest, cfg: Config):
        self.accelerator, self.learner, self.batches, self.monitor = accelerator, learner, batches, monitor
        self.progress, self.stop = progress, stop
        self.config = {**cfg.flat(), "num_classes": learner.card["num_classes"]}  # what each checkpoint records
        self.run, self.epochs, self.flip = cfg.run, cfg.schedule.epochs, cfg.evaluation.eval_flip
        self.clip_grad, self.grad_accum = cfg.optim.clip_grad, cfg.optim.grad_accum
        self.images_per_batch = cfg.optim.batch_size * accelerator.num_processes  # one batch of every rank
        self.out = Path(cfg.run.output_dir)
        self.guard = NonFiniteGuard(accelerator.device, cfg.optim.max_nonfinite_steps)
        self.data_counts = DataCounts()
        self.data = DataWatch(accelerator, remote=is_retried(cfg.data.data_dir or ""),
                              timeout_s=cfg.runtime.dist_timeout)
        self.size_said = None  # the training size last announced on the console
        self.saved_step = -1  # the step of the newest checkpoint this run wrote
        self.epoch_batches = self.batches_in_epoch()
        self.compile_notice = CompileNotice(cfg.runtime.compile)
        learner.clock.step = self.schedule_step()
        if progress.global_step:  # resumed: this run's peak LR at the checkpoint's point of the schedule
            set_schedule(learner.optimizer, learner.scheduler, peak_lr(cfg.optim, accelerator.num_processes))

    def fit(self) -> StopReason | None:
        """Epochs to the last, with evaluation and checkpoints; returns why it stopped early, if it did."""
        p = self.progress
        if self.evaluation_missed() and self.evaluate_epoch():
            self.saved_step = p.global_step  # the checkpoint this run resumed from
            return StopReason.DATA_OUTAGE
        while p.epoch < self.epochs:
            reason = self.train_epoch(p.epoch)
            # --max-steps on the epoch's last step still ends the epoch: its records, evaluation and checkpoint
            if reason and not (reason is StopReason.MAX_STEPS and p.batch_in_epoch == self.epoch_batches):
                return reason
            ended = self.end_epoch()
            if ended:
                return ended
            if reason:
                return reason
        return None

    def end_epoch(self) -> StopReason | None:
        """The epoch's records, then the next epoch's start: evaluation and a checkpoint; NONFINITE when the
        numbers went non-finite (nothing saved), DATA_OUTAGE when the evaluation could not read its shards (the
        checkpoint is written, and the resumed run evaluates first)."""
        p = self.progress
        self.report_bad_samples()
        # logged when the epoch ends, before its checkpoint, so a resume neither repeats nor loses the record
        self.monitor.log(p.global_step, {"epoch": p.epoch, "resolution": self.batches.resolution.at(p.epoch)},
                         "epoch")
        p.start_epoch(p.epoch + 1)
        self.epoch_batches = self.batches_in_epoch()
        outage = self.eval_due() and self.evaluate_epoch()
        if self.save() is not None:
            return StopReason.NONFINITE
        return StopReason.DATA_OUTAGE if outage else None

    def eval_due(self) -> bool:
        p = self.progress
        return self.batches.val is not None and (p.epoch % self.run.eval_every == 0 or p.epoch == self.epochs)

    def evaluation_missed(self) -> bool:
        """Resumed at an epoch's start whose evaluation a data outage stopped: it runs before training goes on."""
        p = self.progress
        return p.global_step > 0 and p.batch_in_epoch == 0 and p.last_eval_step != p.global_step and self.eval_due()

    def evaluate_epoch(self) -> bool:
        """The evaluation due at an epoch's start, and the best top-1 so far; True when a data outage stopped it."""
        p = self.progress
        try:
            result = self.evaluate(p.epoch - 1)
        except DataOutage as e:
            self.data.message = str(e)
            return True
        if result["top1"] > p.best_top1:
            p.best_top1, p.best_checkpoint = result["top1"], step_name(p.global_step)
        return False

    def batches_in_epoch(self) -> int:
        """Batches per rank in the current epoch (in its current segment), whole optimizer steps only."""
        n = self.batches.train.batches_in(current_segment(self.progress))
        return n // self.grad_accum * self.grad_accum

    def schedule_step(self) -> float:
        """The point of the LR schedule, in optimizer steps of this run: whole epochs, plus the share of this
        epoch's images used so far (exactly the step count while the layout stays as the epoch began)."""
        p, per_epoch = self.progress, self.batches.steps_per_epoch
        used = p.images_before_segment + p.batch_in_epoch * self.images_per_batch
        total = p.images_before_segment + self.epoch_batches * self.images_per_batch
        return p.epoch * per_epoch + (per_epoch * used / total if total else per_epoch) - p.skipped_steps

    def train_epoch(self, epoch: int) -> StopReason | None:
        """One epoch from ``progress.batch_in_epoch`` (mid-epoch after a resume)."""
        a, p, learner, prep = self.accelerator, self.progress, self.learner, self.batches.prep
        self.batches.train.set_epoch(epoch, start_batch=p.batch_in_epoch, image_size=self.resolution(epoch),
                                     segment=current_segment(p))
        learner.model.train()
        bar = progress_bar(self.run.progress and a.is_main_process, epoch, self.epoch_batches, p.batch_in_epoch)
        meter, it, reason = StepMeter(a.device), iter(self.batches.train), None
        while p.batch_in_epoch < self.epoch_batches and not reason:
            # data: wait for the loader (timed), then normalise and mix on the device
            meter.start_wait()
            batch = self.data.next_batch(it)
            meter.end_wait()
            if batch is None:  # a remote store is down, on some rank: every rank stops before this step
                reason = StopReason.DATA_OUTAGE
                break
            images, labels = batch
            images, labels, targets = prep(images, labels)
            if p.global_step == 0 and p.batch_in_epoch == 0:
                self.monitor.image_grid(prep.for_display(images), 0)
            # forward, backward, and an optimizer step once every --grad-accum batches
            self.compile_notice.before_step()
            with a.accumulate(learner.model):
                loss = learner.criterion(learner.model(images), targets)
                if p.global_step == FAULTS.nan_at_step:
                    loss = loss * float("nan")
                a.backward(loss)
                if a.sync_gradients and self.clip_grad > 0:
                    a.clip_grad_norm_(learner.model.parameters(), self.clip_grad)
                learner.optimizer.step()
                learner.optimizer.zero_grad(set_to_none=True)
            self.compile_notice.after_step()
            # bookkeeping on the device: no sync per step
            p.batch_in_epoch += 1
            self.guard.add(loss)
            meter.add(loss.detach(), labels.numel())
            bar.update(1) if bar else None
            if a.sync_gradients:
                reason = self.after_step(meter)
        bar.close() if bar else None
        return reason

    def resolution(self, epoch: int) -> int:
        """This epoch's training size, said when it changes (torch.compile and cuDNN see a new shape then: one
        recompile, or one autotuning, per new size; README, "Train"); fit() logs it when the epoch ends."""
        size = self.batches.resolution.at(epoch)
        if size != self.size_said:
            console.say(f"epoch {epoch}: training at {size}x{size} px")
            self.size_said = size
        return size

    def after_step(self, meter: StepMeter) -> StopReason | None:
        """Schedule, EMA, logging, checkpoints and the stop check, after each optimizer step."""
        a, p, learner = self.accelerator, self.progress, self.learner
        if a.optimizer_step_was_skipped:
            p.skipped_steps += 1  # fp16 overflow: the scaler skipped it, so the schedule must not advance
            console.say(f"step {p.global_step}: fp16 overflow, step skipped (loss scale now {self.loss_scale()})")
        else:
            learner.clock.step = self.schedule_step()
            learner.scheduler.step()
        p.global_step += 1
        if learner.ema is not None:
            # no step: timm's EMA warmup is off (use_warmup=False), so the decay is --ema-decay from the first step
            learner.ema.update(bare(a, learner.model))
        if p.global_step % self.run.log_every == 0:
            self.log_interval(meter)
        if p.global_step == FAULTS.pause_at_step:
            FAULTS.pause(lambda: self.stop.requested)
        epoch_end = p.batch_in_epoch == self.epoch_batches  # end_epoch() saves after evaluating
        if self.run.checkpoint_every and p.global_step % self.run.checkpoint_every == 0 and not epoch_end:
            if self.save():
                return StopReason.NONFINITE
        if self.run.max_steps and p.global_step >= self.run.max_steps:
            return StopReason.MAX_STEPS
        if p.global_step % STOP_CHECK_EVERY == 0:
            return agree_to_stop(a, self.guard, self.stop)
        return None

    def log_interval(self, meter: StepMeter) -> None:
        a, p = self.accelerator, self.progress
        stats = meter.read(a)
        stats["lr"] = self.learner.optimizer.param_groups[0]["lr"]
        if a.scaler is not None:
            stats["loss_scale"] = self.loss_scale()
            stats["skipped_steps"] = p.skipped_steps
        if a.device.type == "cuda":
            stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.monitor.log_train(p.global_step, p.epoch, stats)

    def loss_scale(self) -> float:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def trained_epoch(self) -> int:
        """The epoch whose steps were the last trained: the current one mid-epoch, else the one just ended."""
        p = self.progress
        return max(0, p.epoch - (p.batch_in_epoch == 0))

    def evaluate(self, epoch: int) -> dict:
        """Top-1/top-5 of the model (and its EMA) on the whole validation split, logged and remembered; ``epoch``
        is the one just trained, numbered as the training lines number it."""
        a, p, val, prep = self.accelerator, self.progress, self.batches.val, self.batches.prep
        result = evaluate(self.learner.model, val, prep, a, flip=self.flip)
        check_count(result, val)
        scalars = {"top1": result["top1"], "top5": result["top5"], "images": result["images"]}
        if self.learner.ema is not None:
            ema = evaluate(self.learner.ema.module, val, prep, a, flip=self.flip)
            scalars.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        self.monitor.log(p.global_step, scalars, "val")
        p.last_eval_step, p.last_eval = p.global_step, result
        p.history.append({"step": p.global_step, "epoch": epoch, "top1": result["top1"]})
        ema_text = f"  ema top1 {scalars['ema_top1']:.2f}" if self.learner.ema is not None else ""
        console.say(f"epoch {epoch} step {p.global_step}: val top1 {result['top1']:.2f}  "
                    f"top5 {result['top5']:.2f}  ({result['images']} images){ema_text}")
        return result

    def report_bad_samples(self) -> None:
        """The epoch's data counts, over all ranks (engine/monitor.py, DataCounts)."""
        self.data_counts.report(self.accelerator, self.batches.train, self.monitor, self.progress)

    def save(self) -> StopReason | None:
        """A checkpoint, unless the loss or the weights went non-finite: then NONFINITE, and nothing is written."""
        a, learner = self.accelerator, self.learner
        if unsafe_to_save(a, self.guard, bare(a, learner.model)):
            return StopReason.NONFINITE
        root = self.out / "checkpoints"
        try:
            save_checkpoint(a, root, self.progress, learner.ema, self.run.keep_checkpoints, self.config)
            self.saved_step = self.progress.global_step
        except CheckpointError as e:
            states = [bare(a, learner.model).state_dict(), learner.optimizer.state_dict()]
            states += [learner.ema.module.state_dict()] if learner.ema is not None else []
            console.fatal(failure_message(root, self.progress.global_step, str(e), state_bytes(*states)),
                          main_only=True)
        return None

    def finish(self, reason: StopReason | None) -> int:
        """The final evaluation and export; or a checkpoint and the requeue code after a signal; or, when the
        numbers went non-finite, the error and exit code 1 with the last good checkpoint untouched."""
        a, p, model = self.accelerator, self.progress, self.learner.model
        if reason is StopReason.DATA_OUTAGE:
            return self.stop_for_outage()
        if reason in (StopReason.SIGNAL, StopReason.MAX_STEPS) and self.saved_step != p.global_step:
            reason = self.save() or reason
        if reason is StopReason.NONFINITE:
            newest = checkpoint_dirs(self.out / "checkpoints")
            console.fatal(self.guard.message(p.global_step, bare(a, model), newest[-1] if newest else None),
                          main_only=True)
        if reason is StopReason.SIGNAL:
            console.say(f"stopped by signal at step {p.global_step}; checkpoint written; resume with --resume auto")
            self.stop.ignore_from_now_on()
            return EXIT_REQUEUE
        final = {}
        if self.batches.val is not None:
            final = p.last_eval if p.last_eval_step == p.global_step else self.evaluate(self.trained_epoch())
            console.say(f"final top1={final['top1']:.2f} top5={final['top5']:.2f} images={final['images']} "
                        f"step={p.global_step}")
        sync_buffers(a, bare(a, model))
        check_replicas(a, model, self.out)
        export_model(a, model, self.out, self.learner.card, self.learner.ema)
        self.monitor.close({k: v for k, v in final.items() if k in ("top1", "top5")})
        console.say(f"model written to {self.out / 'model.pt'}; view curves with: tensorboard --logdir {self.out}")
        return 0

    def stop_for_outage(self) -> int:
        """A data outage: the last complete optimizer step checkpointed (a half-accumulated one is read again on
        resume), one line naming the shard and the cause, and the requeue code."""
        p = self.progress
        p.batch_in_epoch -= p.batch_in_epoch % self.grad_accum
        self.learner.optimizer.zero_grad(set_to_none=True)
        if self.saved_step != p.global_step and self.save() is StopReason.NONFINITE:
            return self.finish(StopReason.NONFINITE)
        self.report_bad_samples()  # the retries that came before the outage
        return exit_for_outage(self.out, f"stopped at step {p.global_step}, checkpoint written: {self.data.message}",
                               self.accelerator.is_main_process)
