"""The MLflow Model Registry: a trained model, with its preprocessing, under a name and alias.

``noisyseg register --run-id ID --name NAME [--alias champion]`` (and ``train --register NAME``,
``tune --best SWEEP --register NAME``) logs, into the training run, an ``mlflow.pyfunc`` model
named :data:`PYFUNC_NAME` and registers it:

* the model is :class:`NoisysegUNet`, logged as "models from code"
  (:mod:`noisyseg.distributed.pyfunc_entry`: loading it unpickles no code); its artifacts are
  the run's ``checkpoint/final.pt`` (loaded with ``torch.load(weights_only=True)``) and
  ``preprocessing.json`` (:class:`~noisyseg.distributed.scan_inputs.Preprocessing`: channels,
  canonical orientation, target spacing, z-score rule, sliding window, threshold), also kept in
  the model's metadata (``noisyseg_preprocessing``);
* its signature: input a float32 tensor ``(C, -1, -1, -1)`` (raw intensities, store axis order
  ``(c, z, y, x)``), output float32 ``(-1, -1, -1)`` probabilities, optional parameter
  ``spacing`` (mm, ``(z, y, x)``: resample to the model's target spacing and back);
* the registered version is tagged with the run id, and the alias (e.g.
  ``champion``) is pointed at it (``MlflowClient.set_registered_model_alias``).

So ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(volume)`` segments a raw scan,
and ``noisyseg predict --model models:/NAME@champion`` uses the same weights and preprocessing
(:func:`resolve_model` reads any model reference: ``models:/NAME@ALIAS``, ``models:/NAME/3``,
``runs:/ID/...``, a run id or a checkpoint file). MLflow 3 keeps logged models as LoggedModel
entities; a run registered twice re-uses its logged pyfunc model.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import monai
import numpy as np
import scipy
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from noisyseg.distributed.checkpoints import FINAL_FILE, model_from_checkpoint, read_state
from noisyseg.distributed.model_loading import download_run_checkpoint, roi_from_config
from noisyseg.distributed.scan_inputs import CANONICAL, Preprocessing
from noisyseg.distributed.scan_prediction import predict_raw_volume
from noisyseg.distributed.tracking import resolve_tracking_uri
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.store import VolumeStore

PYFUNC_NAME = "noisyseg_model"
#: "Models from code" entry file logged with the model (no pickled code).
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
CHECKPOINT_KEY = "checkpoint"
PREPROCESSING_FILE = "preprocessing.json"
#: Tag of a registered version: the training run it came from.
RUN_TAG = "noisyseg.run_id"


# ----------------------------------------------------------------------------------------------
# Preprocessing of a checkpoint


def _store_geometry(store_url: str | None) -> dict[str, Any]:
    """Channel names, canonical orientation and target spacing of the training store, from
    what ingest recorded with its ``truth`` set (``source`` ``ingest``, ``layout`` nnunet/brats:
    NIfTI cases reoriented to RAS; ``target_spacing``). Empty when the store cannot be opened:
    the model then carries what the checkpoint knows."""
    if not store_url:
        return {}
    try:
        store = VolumeStore.open(store_url)
        params = dict(store.label_set_info("truth").get("params") or {})
    except (NoisysegInputError, OSError, ValueError):
        return {}
    nifti = params.get("source") == "ingest" and params.get("layout") in ("nnunet", "brats")
    spacing = params.get("target_spacing")
    return {
        "channel_names": list(store.channel_names),
        "orientation": CANONICAL if nifti else None,
        "target_spacing": tuple(float(s) for s in spacing) if spacing else None,
        "image_interpolation": params.get("image_interpolation") if spacing else None,
    }


def preprocessing_for(checkpoint: dict[str, Any], *, threshold: float = 0.5) -> Preprocessing:
    """The :class:`Preprocessing` of a checkpoint (``unet_spec`` + training ``config`` + what its
    training store recorded)."""

    spec = dict(checkpoint["unet_spec"])
    config = dict(checkpoint.get("config") or {})
    dims = int(spec.get("spatial_dims", 3))
    geometry = _store_geometry(config.get("store"))
    return Preprocessing(
        in_channels=int(spec["in_channels"]),
        spatial_dims=dims,
        channel_names=geometry.get("channel_names"),
        orientation=geometry.get("orientation"),
        target_spacing=geometry.get("target_spacing"),
        roi_size=roi_from_config(config, dims, default=64),
        overlap=float(config.get("val_overlap", 0.25)),
        sw_batch_size=int(config.get("val_sw_batch_size", 4)),
        threshold=float(threshold),
        # how ingest resampled the training images (--image-interpolation); predict does the same
        extra=(
            {"image_interpolation": geometry["image_interpolation"]}
            if geometry.get("image_interpolation")
            else {}
        ),
    )


# ----------------------------------------------------------------------------------------------
# The pyfunc model


class NoisysegUNet(PythonModel):
    """The U-Net from ``checkpoint/final.pt`` (``weights_only=True``) plus its preprocessing."""

    # The logged tensor signature validates the input: MLflow's type-hint validation is off,
    # and ``predict`` has no hint on ``model_input`` (MLflow would infer a second signature
    # from one and warn that it cannot).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        checkpoint = read_state(context.artifacts[CHECKPOINT_KEY])
        self.model, _ = model_from_checkpoint(checkpoint, source="registered model")
        prep = Path(context.artifacts[PREPROCESSING_FILE]).read_text()
        self.preprocessing = Preprocessing.from_dict(json.loads(prep))
        config = dict(getattr(context, "model_config", None) or {})
        self.device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 (see above)
        """``(C, Z, Y, X)`` raw intensities -> ``(Z, Y, X)`` float32 lesion probabilities.

        ``params={"spacing": [z, y, x]}``: the volume's voxel size in mm; with it, the volume
        is resampled to the model's target spacing (when it has one) and the map back.
        """
        volume = np.asarray(model_input, dtype=np.float32)
        spacing = [float(s) for s in (params or {}).get("spacing") or []] or None
        return predict_raw_volume(
            self.model, volume, self.preprocessing, spacing=spacing, device=self.device
        )


def signature(preprocessing: Preprocessing) -> Any:
    """Tensor signature ``(C, -1, ...) -> (-1, ...)`` float32, optional param ``spacing``."""
    dims = preprocessing.spatial_dims
    return ModelSignature(
        inputs=Schema(
            [TensorSpec(np.dtype(np.float32), (preprocessing.in_channels,) + (-1,) * dims)]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) * dims)]),
        params=ParamSchema([ParamSpec("spacing", "double", [], shape=(-1,))]),
    )


def _requirements() -> list[str]:
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"monai=={monai.__version__}",
        f"scipy=={scipy.__version__}",
        f"numpy=={np.__version__}",
    ]


# ----------------------------------------------------------------------------------------------
# Registering


@dataclass
class Registration:
    """A registered model version."""

    name: str
    version: str
    alias: str | None
    run_id: str
    model_uri: str  # the logged model (``models:/m-...``)

    @property
    def uri(self) -> str:
        """``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION`` without an alias)."""
        return (
            f"models:/{self.name}@{self.alias}"
            if self.alias
            else f"models:/{self.name}/{self.version}"
        )


def _client(uri: str) -> Any:

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _existing_pyfunc(client: Any, run: Any) -> str | None:
    """``models:/<model_id>`` of the pyfunc model already logged for this run, if any."""
    try:
        found = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{PYFUNC_NAME}'",
        )
    except Exception:  # noqa: BLE001 - older servers: log a new one
        return None
    ready = [m for m in found if str(getattr(m, "status", "READY")).endswith("READY")]
    return f"models:/{ready[0].model_id}" if ready else None


def log_pyfunc(run_id: str, tracking_uri: str, *, threshold: float = 0.5) -> str:
    """Log the run's final checkpoint as a pyfunc model into the run; returns its model URI.

    The run keeps its status (a FINISHED run is re-opened for the log and finished again).
    """

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise NoisysegInputError(f"no MLflow run {run_id!r}", path=tracking_uri) from None
    existing = _existing_pyfunc(client, run)
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory(prefix="noisyseg-register-") as tmp:
        checkpoint_path = download_run_checkpoint(run_id, tmp)
        checkpoint = read_state(checkpoint_path)
        preprocessing = preprocessing_for(checkpoint, threshold=threshold)
        prep_path = Path(tmp) / PREPROCESSING_FILE
        prep_path.write_text(json.dumps(preprocessing.to_dict(), indent=2))
        mlflow.set_tracking_uri(tracking_uri)
        active = mlflow.active_run()
        if active is not None and active.info.run_id != run_id:
            raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active")
        status = run.info.status
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # no input example: running one costs a whole sliding-window prediction
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=PYFUNC_NAME,
                python_model=str(ENTRY_FILE),
                artifacts={
                    CHECKPOINT_KEY: str(checkpoint_path),
                    PREPROCESSING_FILE: str(prep_path),
                },
                signature=signature(preprocessing),
                pip_requirements=_requirements(),
                metadata={
                    "noisyseg_preprocessing": preprocessing.to_dict(),
                    "noisyseg_step": int(checkpoint.get("step", 0)),
                },
            )
        if status != "RUNNING":
            client.set_terminated(run_id, status=status)
    return info.model_uri


def register_run(
    run_id: str,
    name: str,
    *,
    alias: str | None = None,
    tracking_uri: str | None = None,
    threshold: float = 0.5,
) -> Registration:
    """Log the run's model (:func:`log_pyfunc`), register it as a new version of ``name`` and
    point ``alias`` at that version.

    Raises:
        NoisysegInputError: unknown run, a run without ``checkpoint/final.pt``, a bad name.
    """

    check_registry_names(name, alias)
    uri = tracking_uri or resolve_tracking_uri()
    model_uri = log_pyfunc(run_id, uri, threshold=threshold)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = mlflow.register_model(model_uri, name, tags={RUN_TAG: run_id})
    client = _client(uri)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return Registration(name, str(version.version), alias, run_id, model_uri)


def check_registry_names(name: str, alias: str | None = None) -> None:
    """A registered model name and alias the registry accepts (checked before any work).

    Raises:
        NoisysegInputError: other characters than letters, digits, ``.``, ``_``, ``-``, or an
            alias MLflow reserves (``latest``, ``v<number>``).
    """
    for value, what in ((name, "model name"), (alias, "alias")):
        if value is None and what == "alias":
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value or ""):
            raise NoisysegInputError(
                f"{what} {value!r} must be letters, digits, '.', '_', '-' (starting with a "
                "letter or digit)"
            )
    if alias is not None and re.fullmatch(r"[vV]\d+|latest", alias):
        raise NoisysegInputError(f"alias {alias!r} is reserved by MLflow (v<number>, latest)")


# ----------------------------------------------------------------------------------------------
# Reading any model reference


@dataclass
class ResolvedModel:
    """A model to predict with: checkpoint dict, preprocessing, where it came from."""

    checkpoint: dict[str, Any]
    preprocessing: Preprocessing
    source: str
    run_id: str | None


def _looks_like_run_id(text: str) -> bool:
    return len(text) >= 8 and all(c in "0123456789abcdef" for c in text.lower())


def resolve_model(source: str, *, threshold: float = 0.5) -> ResolvedModel:
    """Checkpoint and preprocessing of ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (the
    registered pyfunc's artifacts), ``runs:/ID/...`` or a run id (the run's
    ``checkpoint/final.pt``), or a checkpoint file / Ray checkpoint directory.

    Raises:
        NoisysegInputError: unknown model, alias, run or file (one line).
    """
    if source.startswith("models:/"):
        return _resolve_registered(source)
    if source.startswith("runs:/"):
        run_id = source.removeprefix("runs:/").split("/", 1)[0]
    elif not Path(source).exists() and _looks_like_run_id(source):
        run_id = source
    else:
        checkpoint = read_state(source)
        return ResolvedModel(
            checkpoint, preprocessing_for(checkpoint, threshold=threshold), source, None
        )
    with tempfile.TemporaryDirectory(prefix="noisyseg-model-") as tmp:
        checkpoint = read_state(download_run_checkpoint(run_id, tmp))
    return ResolvedModel(
        checkpoint, preprocessing_for(checkpoint, threshold=threshold), source, run_id
    )


def _resolve_registered(source: str) -> ResolvedModel:

    uri = resolve_tracking_uri()
    client = _client(uri)
    reference = source.removeprefix("models:/")
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = reference.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError):
        raise NoisysegInputError(
            "no such registered model version (see `mlflow models` / the MLflow UI, Models)",
            path=f"{source} on {uri}",
        ) from None
    with tempfile.TemporaryDirectory(prefix="noisyseg-model-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=tmp, tracking_uri=uri
                )
            )
        except (MlflowException, OSError) as error:
            first = (str(error).splitlines() or [""])[0][:160]
            raise NoisysegInputError(f"cannot download the model ({first})", path=source) from None
        files = {p.name: p for p in local.rglob("*") if p.is_file()}
        if FINAL_FILE not in files or PREPROCESSING_FILE not in files:
            raise NoisysegInputError(
                "not a noisyseg model (no final.pt / preprocessing.json; register it with "
                "`noisyseg register`)",
                path=source,
            )
        checkpoint = read_state(files[FINAL_FILE])
        preprocessing = Preprocessing.from_dict(json.loads(files[PREPROCESSING_FILE].read_text()))
    run_id = version.run_id or (version.tags or {}).get(RUN_TAG)
    return ResolvedModel(checkpoint, preprocessing, source, run_id)
