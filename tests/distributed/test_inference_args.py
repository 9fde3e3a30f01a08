"""The flags ``predict``, ``evaluate`` and ``audit`` share: where the forward passes run.

``resolve_device`` is checked with ``torch.cuda.is_available`` pinned either way (so the test
means the same on a GPU machine); the CLI tests run each verb with ``--gpu`` on this machine's
view of CUDA pinned to "none" and expect the one-line refusal before any prediction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from cluster_utils import make_ball_store

from noisyseg.cli import main
from noisyseg.distributed.inference_args import (
    add_parallel_args,
    add_window_args,
    resolve_device,
    uses_ray,
)
from noisyseg.errors import NoisysegInputError
from noisyseg.models import UNetSpec, build_unet

SPEC = UNetSpec(spatial_dims=3, in_channels=1, channels=(4, 8), num_res_units=0, norm="batch")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture
def with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_default_device_follows_what_this_process_sees(no_cuda) -> None:
    assert resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_default_device_is_cuda_when_present(with_cuda) -> None:
    assert resolve_device(None) == "cuda"
    assert resolve_device(None, gpu=True) == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"


def test_gpu_without_a_local_gpu_is_refused_unless_joining_a_cluster(
    no_cuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    for use_ray in (False, True):  # in-process, or a local Ray instance on this machine
        with pytest.raises(NoisysegInputError, match="no CUDA GPU is available"):
            resolve_device(None, gpu=True, use_ray=use_ray)
    with pytest.raises(NoisysegInputError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    # the cluster's actors each reserve a GPU there; this driver needs none
    assert resolve_device(None, gpu=True, use_ray=True) == "cuda"
    with pytest.raises(NoisysegInputError, match="no CUDA GPU"):  # in-process stays local
        resolve_device(None, gpu=True, use_ray=False)


def test_unknown_device_is_refused(no_cuda) -> None:
    with pytest.raises(NoisysegInputError, match="unknown torch device 'gpu0'"):
        resolve_device("gpu0")


def test_uses_ray_on_flag_workers_or_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_parallel_args(parser)
    add_window_args(parser)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not uses_ray(parser.parse_args([]))
    assert uses_ray(parser.parse_args(["--ray"]))
    assert uses_ray(parser.parse_args(["--workers", "2"]))
    args = parser.parse_args(["--gpu"])
    assert args.gpu and not uses_ray(args)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert uses_ray(parser.parse_args([]))


@pytest.fixture
def store_and_checkpoint(tmp_path: Path) -> tuple[str, Path]:
    store = make_ball_store(tmp_path / "s.zarr", train=1, val=0, size=16)
    path = tmp_path / "final.pt"
    torch.save(
        {
            "model": build_unet(SPEC).state_dict(),
            "unet_spec": SPEC.to_dict(),
            "config": {"patch_size": 16},
            "step": 1,
        },
        path,
    )
    return store, path


def _verb_argv(verb: str, store: str, checkpoint: Path) -> list[str]:
    """A ``verb`` command line on the tiny store that fails only on the flags the test adds."""
    return {
        "predict": [
            "predict",
            "--store",
            store,
            "--checkpoint",
            str(checkpoint),
            "--split",
            "train",
        ],
        "evaluate": [
            *("evaluate", "--store", store, "--checkpoint", str(checkpoint)),
            *("--split", "train", "--no-log"),
        ],
        "audit": ["audit", "--model", str(checkpoint), "--store", store, "--labels", "noisy"],
    }[verb]


@pytest.mark.parametrize("verb", ["predict", "evaluate", "audit"])
def test_every_inference_verb_refuses_gpu_without_one_in_one_line(
    verb: str, store_and_checkpoint, no_cuda, capsys
) -> None:
    store, checkpoint = store_and_checkpoint
    argv = _verb_argv(verb, store, checkpoint)
    for extra in (["--gpu"], ["--gpu", "--workers", "2"]):
        assert main([*argv, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "no CUDA GPU is available" in err[0], (verb, extra, err)


@pytest.mark.parametrize("verb", ["predict", "evaluate", "audit"])
def test_every_inference_verb_refuses_fewer_than_one_worker(
    verb: str, store_and_checkpoint, no_cuda, capsys
) -> None:
    store, checkpoint = store_and_checkpoint
    argv = _verb_argv(verb, store, checkpoint)
    assert main([*argv, "--workers", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--workers must be >= 1, got 0" in err[0], (verb, err)
