"""engine/monitor.py: what the per-interval line reports on many ranks."""

import torch

from engine.monitor import StepMeter


class TwoRanks:
    """Rank 0's view of a 2-process run whose other rank had a loss sum of 6 over 2 batches and waited for data
    half of the interval."""

    num_processes = 2

    def gather(self, mine: torch.Tensor) -> torch.Tensor:
        return torch.cat([mine, torch.tensor([[6.0, 2.0, 0.5]])])


def test_the_interval_reports_the_mean_loss_of_all_ranks_and_the_slowest_ranks_data_wait():
    """Loss and data wait came from rank 0 alone: the data-wait warning never saw a slow rank."""
    meter = StepMeter(torch.device("cpu"))
    for loss in (1.0, 3.0):
        meter.start_wait()
        meter.end_wait()
        meter.add(torch.tensor(loss), 4)
    stats = meter.read(TwoRanks())
    assert stats["loss"] == 2.5 and stats["data_wait_fraction"] == 0.5
    assert meter.batches == 0, "the next interval starts afresh"
