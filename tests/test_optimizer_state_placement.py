"""A restored Adam ``step`` goes where torch's own ``Optimizer.load_state_dict`` puts it: for fused or capturable
Adam/AdamW on the parameter's device in fp32 (their kernels read it there; left on the CPU, the first CUDA step
fails), otherwise as saved, on the CPU. torch itself is the oracle: its ``load_state_dict`` runs on parameters on
the ``meta`` device, which stands in for a GPU here (placement needs no kernel), next to our restore."""

from __future__ import annotations

import pytest
import torch

from wsd_pretrain.checkpoint.adapters import step_tensor


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("flags", [{}, {"fused": True}, {"capturable": True}])
def test_a_restored_step_is_placed_as_torch_places_it(optimizer, flags):
    param = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = optimizer([param], lr=1e-3, **flags)
    saved = torch.tensor(5.0, dtype=torch.float64)  # as read from a checkpoint: a CPU tensor
    opt.load_state_dict(
        {
            "state": {0: {"step": saved.clone(), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
            "param_groups": opt.state_dict()["param_groups"],
        }
    )
    theirs = opt.state[param]["step"]
    ours = step_tensor(saved, param, opt.param_groups[0])
    assert (ours.device, ours.dtype) == (theirs.device, theirs.dtype)
    if flags:
        assert ours.device.type == "meta", "fused/capturable: the step must live with the parameter"
    else:
        assert ours.device.type == "cpu" and ours.item() == 5.0
