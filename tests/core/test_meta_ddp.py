"""Meta reweighting under DDP: 2 gloo ranks == 1 process on the concatenated batches.

Each rank holds half of the noisy batch and half of the clean batch. With ``sync`` (the default
for a DDP-wrapped model) the clean gradient is averaged over the ranks and ``Σ w̃`` is the global
sum, so each rank's weights are its slice of the weights one process computes on the whole
batches, and the update (lopsided loss weighted by clean-BCE weights) is the same. The network
uses instance norm, so each sample's output does not depend on the others in its batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from cluster_utils import free_port
from gloo_ranks import GLOO_TIMEOUT, run_gloo_ranks
from torch import nn

from noisyseg.losses import LopsidedBootstrapLoss
from noisyseg.models import build_unet
from noisyseg.reweight import meta_pixel_weights, meta_reweighted_step

B = 2  # per-rank noisy batch
M = 3  # per-rank clean batch
SETTINGS = (("fast", False), ("head", True))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_unet(channels=(4, 8), num_res_units=1, norm="instance").double()


def _batches() -> tuple[torch.Tensor, ...]:
    """Noisy ``(2B, 1, 8, 8, 8)`` about 20 % lesion; clean ``(2M, ...)`` about 30 % lesion."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2 * B, 1, 8, 8, 8, generator=generator, dtype=torch.float64)
    y = (torch.rand(2 * B, 1, 8, 8, 8, generator=generator) < 0.2).double()
    xc = torch.randn(2 * M, 1, 8, 8, 8, generator=generator, dtype=torch.float64)
    yc = (torch.rand(2 * M, 1, 8, 8, 8, generator=generator) < 0.3).double()
    return x, y, xc, yc


def _step(model: nn.Module, batches, method: str, share: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return meta_reweighted_step(
        model,
        optimizer,
        *batches,
        loss=LopsidedBootstrapLoss(0.6),
        method=method,
        share_forward=share,
    )


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
        x, y, xc, yc = _batches()
        mine = (
            x[rank * B : (rank + 1) * B],
            y[rank * B : (rank + 1) * B],
            xc[rank * M : (rank + 1) * M],
            yc[rank * M : (rank + 1) * M],
        )
        results = {}
        for method, share in SETTINGS:
            model = nn.parallel.DistributedDataParallel(_model())
            local = meta_pixel_weights(model, *mine, method=method, sync=False)
            result = _step(model, mine, method, share)
            results[method] = {
                "weights": result.weights,
                "local_weights": local,
                "state": model.module.state_dict(),
                "scalars": {k: v for k, v in vars(result).items() if k != "weights"},
            }
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_ranks_give_the_weights_and_update_of_one_process(tmp_path) -> None:
    out = str(tmp_path / "meta")
    run_gloo_ranks(__file__, "_rank", [2, free_port(), out])
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    batches = _batches()
    for method, share in SETTINGS:
        single = _model()
        initial = copy.deepcopy(single.state_dict())
        result = _step(single, batches, method, share)
        ddp_weights = torch.cat([ranks[0][method]["weights"], ranks[1][method]["weights"]])
        assert result.weights.sum().item() == pytest.approx(1.0)
        assert 0 < int((result.weights > 0).sum()) < result.weights.numel()
        torch.testing.assert_close(ddp_weights, result.weights, rtol=1e-9, atol=1e-15)
        for rank in ranks:  # every rank took the single process's step
            for name, value in single.state_dict().items():
                torch.testing.assert_close(rank[method]["state"][name], value, msg=name)
        moved = max(float((single.state_dict()[k] - initial[k]).abs().max()) for k in initial)
        assert moved > 1e-4  # the step changed the weights, so the comparison means something
        scalars = ranks[0][method]["scalars"]
        assert scalars == ranks[1][method]["scalars"]  # global figures, the same on each rank
        for key in ("loss", "unweighted_loss", "clean_loss", "lesion_weight_share"):
            assert scalars[key] == pytest.approx(getattr(result, key), rel=1e-9), key
        for key in ("positive_fraction", "noisy_lesion_fraction", "clean_lesion_fraction"):
            assert scalars[key] == pytest.approx(getattr(result, key), rel=1e-12), key
        # a rank normalising against its own half alone (no sync) would not give these weights
        local = ranks[0][method]["local_weights"]
        assert local.sum().item() == pytest.approx(1.0)
        assert not torch.allclose(local, ddp_weights[:B], rtol=1e-3)
