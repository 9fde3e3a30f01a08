"""DDP correctness: 2 gloo ranks with batch b each == 1 process with batch 2b, after one step.

Both sides run the training loop's own :func:`train_step` (mean loss, so DDP's gradient average
over ranks equals the gradient of the mean over the concatenated batch). The network uses
instance norm, so each sample's output does not depend on the others in its batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cluster_utils import free_port
from gloo_ranks import GLOO_TIMEOUT, run_gloo_ranks

from noisyseg.distributed.config import make_config
from noisyseg.distributed.train_loop import make_optimizer, make_step_loss, train_step
from noisyseg.models import build_unet

B = 2  # per-rank batch


def _config():
    return make_config(
        {
            "store": "unused",
            "loss": "lopsided",
            "entropy_weight": 0.3,
            "channels": [4, 8, 16],
            "num_res_units": 1,
            "lr": 0.1,
            "patch_size": 16,
        }
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(2 * B, 1, 16, 16, 16, generator=generator)
    labels = (torch.rand(2 * B, 1, 16, 16, 16, generator=generator) > 0.85).float()
    return images, labels


def _fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(_config().unet_spec(3, 1))


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=GLOO_TIMEOUT,
    )
    try:
        config = _config()
        model = torch.nn.parallel.DistributedDataParallel(_fresh_model())
        optimizer = make_optimizer(config, model.parameters())
        images, labels = _batch()
        part = slice(rank * B, (rank + 1) * B)
        train_step(
            model, optimizer, make_step_loss(config), images[part], labels[part], config=config
        )
        if rank == 0:
            torch.save(model.module.state_dict(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_ranks_match_one_process_with_double_batch(tmp_path) -> None:
    out = str(tmp_path / "ddp.pt")
    run_gloo_ranks(__file__, "_rank", [2, free_port(), out])
    ddp_state = torch.load(out, weights_only=True)

    config = _config()
    torch.set_num_threads(1)
    model = _fresh_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(config, model.parameters())
    images, labels = _batch()
    train_step(model, optimizer, make_step_loss(config), images, labels, config=config)
    single_state = model.state_dict()

    moved = 0.0
    for name, value in single_state.items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((value - initial[name]).abs().max()))
    assert moved > 1e-3  # the step really changed the weights, so the comparison means something

    # and a rank that saw only its own half (no gradient averaging) would differ
    half = _fresh_model()
    half_optimizer = make_optimizer(config, half.parameters())
    train_step(half, half_optimizer, make_step_loss(config), images[:B], labels[:B], config=config)
    assert any(
        not torch.allclose(half.state_dict()[k], single_state[k], rtol=1e-5, atol=1e-6)
        for k in single_state
    )
