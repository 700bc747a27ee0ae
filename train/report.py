"""Human-readable end-of-run summary of ``dualfocus train``."""

from __future__ import annotations

from dualfocus.train.loop import TrainSummary


def print_train_summary(s: TrainSummary, console) -> None:
    """Data usage, steps, loss first -> last, throughput, data wait and where the outputs are (rank 0 only:
    under a launcher every rank returns a summary, and the figures in it are already global)."""
    if s.rank != 0:
        return
    console.print(s.usable)
    resumed = f" (resumed at step {s.start_step})" if s.start_step else ""
    console.print(f"steps: {s.steps}{resumed} | loss {s.first_loss:.4f} -> {s.last_loss:.4f}")
    console.print(f"samples: {s.samples} in {s.seconds:.1f} s = {s.samples_per_s:.2f} samples/s | "
                  f"data wait {100 * s.data_wait_fraction:.1f}% of step time")
    console.print(f"trainable parameters: {s.trainable_params:,} | store bytes read per sample: "
                  f"{s.bytes_per_sample / 1024:,.1f} KiB")
    console.print(f"export: {s.export}")
    console.print(f"loss curve: {s.loss_plot}")
