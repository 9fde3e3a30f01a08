"""How much memory one training worker needs, estimated before Ray starts.

:func:`estimate_worker_memory` adds up, per worker (bytes):

* **model state**: parameters, their gradients and the optimiser's buffers (SGD with momentum
  one, AdamW two), float32;
* **activations**: what autograd keeps for the backward pass of one forward on
  ``batch × patch``. It is *measured*, not guessed: the network runs once on PyTorch's ``meta``
  device (shapes only, no memory used, no arithmetic) under ``saved_tensors_hooks``, and the
  distinct storages it saves are summed (parameters left out, they are counted above);
* **passes**: meta pixel reweighting holds about three such graphs at once (noisy forward with
  its dual/virtual step, clean forward, the reweighted loss), so activations count
  :data:`META_PASSES` times;
* **runtime**: a fixed allowance for the Python/PyTorch/Ray process (:data:`RUNTIME_BYTES`), once
  per process (the worker and each DataLoader process).

:func:`check_worker_memory` refuses a run whose estimate exceeds what each worker can have (the
machine's available memory, ``psutil``, shared by the workers; a GPU's memory with ``--gpu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from noisyseg.errors import NoisysegInputError
from noisyseg.models import UNetSpec, build_unet

META_PASSES = 3
RUNTIME_BYTES = 400 * 2**20
_OPTIMIZER_BUFFERS = {"sgd": 1, "adamw": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-worker memory, bytes."""

    parameters: int
    model_state: int
    activations: int
    passes: int
    inputs: int
    runtime: int

    @property
    def total(self) -> int:
        return self.model_state + self.passes * self.activations + self.inputs + self.runtime

    def line(self) -> str:
        """One line for the terminal."""
        passes = f" x {self.passes} passes (meta reweighting)" if self.passes > 1 else ""
        return (
            f"memory per worker ~ {_gib(self.total)}: model+grads+optimizer "
            f"{_gib(self.model_state)} ({self.parameters:,} parameters), activations "
            f"{_gib(self.activations)}{passes}, batch {_gib(self.inputs)}, runtime "
            f"{_gib(self.runtime)}"
        )


def _gib(nbytes: float) -> str:
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.0f} MiB"
    return f"{nbytes / 2**30:.2f} GiB"


def activation_bytes(spec: UNetSpec, batch: int, patch: tuple[int, ...]) -> int:
    """Bytes autograd saves for backward in one forward of ``(batch, C, *patch)``, plus the
    output logits. Measured on the ``meta`` device: no memory is allocated."""
    model = build_unet(spec).to("meta").train()
    parameters = {id(p) for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            storage = tensor.untyped_storage()
            storages[storage._cdata] = max(storages.get(storage._cdata, 0), storage.nbytes())
        return tensor

    inputs = torch.empty((batch, spec.in_channels, *patch), device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(inputs)
    return sum(storages.values()) + logits.numel() * logits.element_size()


def estimate_worker_memory(
    spec: UNetSpec,
    *,
    batch_size: int,
    patch: tuple[int, ...],
    optimizer: str = "sgd",
    reweight: str = "none",
    dataloader_workers: int = 0,
) -> MemoryEstimate:
    """The per-worker estimate of a run (see the module docstring). ``reweight != "none"``
    counts activations :data:`META_PASSES` times and a clean batch as well."""
    parameters = sum(p.numel() for p in build_unet(spec).parameters())
    buffers = 2 + _OPTIMIZER_BUFFERS.get(optimizer, 2)  # weights, grads, optimiser state
    voxels = batch_size * int(torch.tensor(patch).prod())
    streams = 2 if reweight != "none" else 1
    return MemoryEstimate(
        parameters=parameters,
        model_state=parameters * 4 * buffers,
        activations=activation_bytes(spec, batch_size, patch),
        passes=META_PASSES if reweight != "none" else 1,
        inputs=streams * voxels * 4 * (spec.in_channels + 1),
        runtime=RUNTIME_BYTES * (1 + dataloader_workers),
    )


def available_per_worker(workers: int, gpu: bool) -> tuple[int | None, str]:
    """``(bytes, what)`` one worker may use: a visible GPU's memory with ``gpu``, else the
    machine's available memory divided by ``workers``. ``None`` when it cannot be known here."""
    if gpu:
        if not torch.cuda.is_available():
            return None, "GPU memory (no GPU visible to the launcher)"
        return int(torch.cuda.get_device_properties(0).total_memory), "the GPU's memory"
    available = int(psutil.virtual_memory().available)
    return available // max(workers, 1), f"available memory / {workers} worker(s)"


def check_worker_memory(estimate: MemoryEstimate, budget: int | None, what: str) -> None:
    """Refuse (one line) when ``estimate.total`` exceeds ``budget`` bytes."""
    if budget is not None and estimate.total > budget:
        raise NoisysegInputError(
            f"training needs about {_gib(estimate.total)} per worker but {what} is "
            f"{_gib(budget)} ({estimate.line()}); lower --patch-size or --batch-size, use fewer "
            "--workers or smaller --channels"
        )
