"""The ``lmms_eval.models`` entry point (setup.cfg): lmms-eval 0.7.3 reads the manifests of that group when
``lmms_eval.models`` is imported, so ``python -m lmms_eval --model fovlm`` resolves to
:class:`fovlm.eval.lmms.Fovlm`. The class itself (and torch, the model code) is imported only when the model is
used.
"""

from __future__ import annotations

MODEL_ID = "fovlm"
CLASS_PATH = "fovlm.eval.lmms.Fovlm"


def manifest():
    """lmms-eval's ``ModelManifest`` of fovlm (a simple model: plain-text requests, fovlm's own chat template)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
