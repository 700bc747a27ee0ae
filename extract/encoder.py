"""The frozen vision encoder: one forward per frame batch gives both DualFocus streams.

Legend: ``n`` frames in the batch, ``p`` patch tokens (256 for 14 px patches at 224), ``d`` vision width.

- semantic ``[n, p+1, d]``: the vision tower's output after its final layer norm, exactly what the
  InstructBLIP Q-Former cross-attends to;
- spatiotemporal ``[n, p/4, d]``: the second-to-last block's hidden state, patch tokens only (CLS
  dropped), averaged over runs of 4 consecutive tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dualfocus.pipeline.devices import resolve_compute_dtype

POOL_FACTOR = 4
SEMANTIC_LAYER = "post_layernorm(last_hidden_state)"
SPATIOTEMPORAL_LAYER = -2  # index into hidden_states (embeddings first, then one entry per block)


def pool_tokens(hidden, factor: int = POOL_FACTOR):
    """Average ``[n, p, d]`` over consecutive groups of ``factor`` tokens -> ``[n, p/factor, d]``."""
    n, p, d = hidden.shape
    if p % factor:
        raise ValueError(f"token count {p} is not divisible by the pooling factor {factor}")
    return hidden.reshape(n, p // factor, factor, d).mean(dim=2)  # [n, p/4, d]


def encode_pixels(vision_model, pixel_values):
    """Run the vision tower once; returns (semantic ``[n, p+1, d]``, spatiotemporal ``[n, p/4, d]``)."""
    import torch

    with torch.inference_mode():
        out = vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        semantic = out.last_hidden_state                       # [n, p+1, d], post-layernorm
        motion = pool_tokens(out.hidden_states[SPATIOTEMPORAL_LAYER][:, 1:])  # drop CLS -> [n, p/4, d]
    return semantic, motion


def planned_compute_dtype(device: str, compute_dtype: str, gpus_per_actor: float = 0.0) -> str:
    """The dtype the encoder will run in, decided once by the extract driver (and recorded in the fingerprint).

    ``compute_dtype`` ``auto`` becomes bfloat16 when the tower will sit on a GPU: ``device`` names one, or is
    ``auto`` while GPUs are given to the encoder actors or seen here; float32 otherwise. The driver hands the
    result to every encoder actor, so a store's fingerprint always names the precision its numbers came from.
    """
    if compute_dtype != "auto":
        return resolve_compute_dtype(compute_dtype, on_gpu=False)
    if device == "auto":
        import torch

        on_gpu = gpus_per_actor > 0 or torch.cuda.is_available()
    else:
        on_gpu = device.startswith("cuda")
    return resolve_compute_dtype("auto", on_gpu)


class FrameEncoder:
    """Loads the frozen vision tower once and turns uint8 frames into the two cached streams.

    ``device`` is ``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"``; ``compute_dtype`` is the dtype the tower
    runs in (``auto``: bfloat16 on a GPU, float32 on the CPU; see ``pipeline/devices.py``).
    """

    def __init__(self, model_dir: str | Path, device: str = "auto", compute_dtype: str = "auto"):
        import torch

        from dualfocus.pipeline.devices import resolve_device
        from dualfocus.pipeline.models import load_image_spec, load_vision_model

        self.device = resolve_device(device, key="encoder.device")
        self.dtype = getattr(torch, resolve_compute_dtype(compute_dtype, on_gpu=self.device.type == "cuda"))
        self.spec = load_image_spec(model_dir)
        self.model = load_vision_model(model_dir).to(self.device, self.dtype)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[n, H, W, 3]`` -> float32 numpy (semantic ``[n, p+1, d]``, spatiotemporal ``[n, p/4, d]``)."""
        import torch

        from dualfocus.pipeline.models import normalize_frames

        # Normalised and cast on the CPU, then moved: the same numbers on every device, half the bytes in bf16.
        pixels = normalize_frames(torch.from_numpy(np.ascontiguousarray(frames)), self.spec, dtype=self.dtype)
        semantic, motion = encode_pixels(self.model, pixels.to(self.device))
        return semantic.float().cpu().numpy(), motion.float().cpu().numpy()
