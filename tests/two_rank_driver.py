"""Test-only driver for ``tests/test_train_multirank.py``: the real ``dualfocus`` command, run under
torchrun, with two observers wrapped around library functions so the test can compare the ranks.

    torchrun --nproc_per_node 2 tests/two_rank_driver.py RECORD_DIR train STORE QA --model ... --out ...

RECORD_DIR receives, per rank ``r``:
- ``rank{r}_losses.jsonl``: this rank's own (local) loss and sample indices, one line per micro-batch;
- ``rank{r}_step{N}.safetensors``: this rank's trainable weights right after each checkpoint at step N.
Production code has no hook for this; the wrapping lives here only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from dualfocus.cli import app
    from dualfocus.train import checkpoint
    from dualfocus.connectors.video_llm import VideoLLM

    record = Path(sys.argv[1])
    record.mkdir(parents=True, exist_ok=True)
    forward, save = VideoLLM.forward, checkpoint.save_checkpoint

    def recording_forward(self, batch):
        loss = forward(self, batch)
        with open(record / f"rank{dist.get_rank()}_losses.jsonl", "a") as f:
            f.write(json.dumps({"loss": loss.item(), "indices": batch.indices}) + "\n")
        return loss

    def recording_save(engine, run_dir, step, client, keep):
        tag = save(engine, run_dir, step, client, keep)
        weights = {k: v.detach().float().contiguous() for k, v in engine.module.trainable_state_dict().items()}
        save_file(weights, str(record / f"rank{dist.get_rank()}_step{step}.safetensors"))
        return tag

    VideoLLM.forward = recording_forward
    checkpoint.save_checkpoint = recording_save
    sys.argv = ["dualfocus", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    main()
