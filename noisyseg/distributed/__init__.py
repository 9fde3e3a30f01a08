"""noisyseg.distributed: Ray Train workers, launcher, checkpoints, MLflow tracking, inference.

* :mod:`.config` — :class:`TrainConfig` (pydantic; YAML; CLI flags), store checks.
* :mod:`.train_loop` — the per-worker loop (``train_loop_per_worker``) and its plain twin.
* :mod:`.trainer` — :func:`run_training` (``TorchTrainer`` launch, run names, resume).
* :mod:`.tracking` — MLflow: run creation, rank-0 logging, figures.
* :mod:`.checkpoints` — ``state.pt`` / ``final.pt`` format, :func:`load_model_state`.
* :mod:`.inference` — prediction over many cases (:mod:`.sliding_window`, :mod:`.evaluation`,
  :mod:`.model_loading`, :mod:`.prediction_io` hold the other layers).

Only the config is imported eagerly (torch, Ray and MLflow load inside the modules that use them).
"""

from noisyseg.distributed.config import TrainConfig

__all__ = ["TrainConfig"]
