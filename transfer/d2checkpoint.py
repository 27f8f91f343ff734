"""detectron2's checkpointer, minus the two ways it can run code from a weights file.

Stock ``DetectionCheckpointer`` reads ``.pkl`` files with ``pickle.load`` (which runs whatever the file
says) and other files with fvcore's ``torch.load``. :class:`SafeDetectionCheckpointer` reads ``.pkl``
with :func:`transfer.safe_pickle.load_detectron2_pickle` and everything else with
``torch.load(weights_only=True)``; what happens after reading (name-matching heuristics, loading into the
model) is detectron2's own code, unchanged. It also keeps the incompatible-keys result of the last load
(``last_incompatible``) so callers can check it instead of reading logs.

Use it everywhere the suite loads weights into a detectron2 model (the detection runner, verification).
"""

from __future__ import annotations

from typing import Any

from pretrain.checkpoint import safe_torch_load
from transfer.d2compat import import_detectron2
from transfer.safe_pickle import load_detectron2_pickle

import_detectron2()
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that never unpickles arbitrary objects (see module docstring)."""

    last_incompatible: Any = None

    def _load_file(self, filename: str) -> dict[str, Any]:
        local = self.path_manager.get_local_path(filename)
        if filename.endswith(".pkl"):
            data = load_detectron2_pickle(local)
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        loaded = safe_torch_load(local)
        if filename.endswith(".pyth"):  # pycls, as in detectron2
            state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if not isinstance(loaded, dict) or "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _load_model(self, checkpoint: dict[str, Any]) -> Any:
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        return incompatible
