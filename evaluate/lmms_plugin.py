"""Registers the ``dualfocus`` model with lmms-eval (entry point group ``lmms_eval.models``, pyproject.toml).

lmms-eval 0.7 reads every entry point of that group when ``lmms_eval.models`` is imported and imports the class
only when ``--model dualfocus`` selects it, so this module stays import-light.
"""

from __future__ import annotations


def manifests():
    """The model manifest lmms-eval's registry loads: ``--model dualfocus`` -> ``evaluate.lmms_model.DualFocusLMM``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="dualfocus", simple_class_path="dualfocus.evaluate.lmms_model.DualFocusLMM")]
