"""Frozen vision encoders of several families, read as named taps (cuts of one forward).

    from dualfocus.encoders import load_encoder
    enc = load_encoder("models/instructblip")             # family from config.json: eva
    taps = {"semantic": "post_ln", "spatiotemporal": "pool4"}
    enc.tap_shapes(taps)                                   # known before any work
    feats = enc(frames_uint8, taps)                        # one forward, float32 [n, tokens, width] each

Tap grammar and shapes: ``taps.py``; families and what their taps mean: ``families.py``. Importing this
package is cheap: torch and transformers load only when a tower is loaded or run.
"""

from dualfocus.encoders.encoder import Encoder, EncoderInfo, inspect_encoder, load_encoder, prepare_frames
from dualfocus.encoders.families import FAMILIES, Family, detect_family
from dualfocus.encoders.taps import GRAMMAR, Geometry, Tap, check_taps, parse_tap, tap_shape
from dualfocus.encoders.tiny import write_tiny_encoder

__all__ = [
    "FAMILIES", "GRAMMAR", "Encoder", "EncoderInfo", "Family", "Geometry", "Tap", "check_taps", "detect_family",
    "inspect_encoder", "load_encoder", "parse_tap", "prepare_frames", "tap_shape", "write_tiny_encoder",
]
