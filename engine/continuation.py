"""A checkpoint's epoch continued under this run's layout.

Batches count differently under another world size, ``--workers`` or ``--batch-size`` (data/positions.py):
the checkpoint's count is turned back into the samples of the epoch it used, by replaying its readers'
shuffle buffers on integers, and the rest of the epoch is dealt to this run's readers as a new segment.
Every sample is used once in the epoch and fewer than one new global batch is left out; later epochs are
what a fresh run at the new size does. The LR schedule follows the share of the epoch used
(recipe.ScheduleClock), so it continues where it was. Same layout: nothing changes, batch for batch.
"""

from __future__ import annotations

from data.positions import Layout, Segment

from . import console
from .checkpoints import Progress


def current_segment(progress: Progress) -> Segment | None:
    """The segment of ``progress.epoch`` being read, or None while it is the epoch's first."""
    return Segment(progress.epoch, progress.segment, progress.done) if progress.done is not None else None


def continue_epoch(progress: Progress, loader) -> None:
    """Fit ``progress`` (fresh or resumed) to this run's loader: record the layout, and after a change of
    layout continue the epoch from the samples it used. The synthetic loader has no samples: nothing to do."""
    layout, samples = getattr(loader, "layout", None), getattr(loader, "num_samples", 0)
    if layout is None:
        return
    saved = Layout(**progress.layout) if progress.layout else layout  # {}: a checkpoint from before layouts
    mid_epoch = progress.batch_in_epoch > 0 or progress.done is not None
    if mid_epoch and progress.epoch_samples not in (0, samples):
        console.warn(f"the training split now holds {samples} samples, the checkpoint's epoch {progress.epoch} "
                     f"was planned over {progress.epoch_samples}: that epoch starts over")
        progress.start_epoch(progress.epoch)
    elif mid_epoch and saved != layout:
        carry_over(progress, loader, saved)
    progress.layout, progress.epoch_samples = layout.to_dict(), samples


def carry_over(progress: Progress, loader, saved: Layout) -> None:
    """The rest of the epoch as a new segment for this run's layout, said in one line."""
    before = progress.batch_in_epoch
    segment = loader.continued(progress.epoch, current_segment(progress), saved, before)
    used = int(segment.done.sum()) if segment.done is not None else 0
    progress.segment, progress.done, progress.images_before_segment = segment.index, segment.done, used
    progress.batch_in_epoch = 0
    left, batches = loader.num_samples - used, loader.batches_in(segment)
    dropped = left - batches * loader.layout.batch_size * loader.layout.world_size
    console.say(f"epoch {progress.epoch} was read by {saved.describe()} ({before} batches each); it continues on "
                f"{loader.layout.describe()}: {used} of its {loader.num_samples} images used, {left} left, "
                f"{batches} batches per process, {dropped} left out (less than one global batch)")
