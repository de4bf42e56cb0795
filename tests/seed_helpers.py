"""The helper the seed's WSD test suite imports (tests/test_seed_wsd_scheduler.py).

Copied from pytorch-accelerated 0.1.61, test/scheduler/test_cosine_scheduler.py
(https://github.com/Chris-hughes10/pytorch-accelerated, tag v0.1.61). Author: Chris Hughes. Licensed under the
Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). Unchanged.
"""

import torch


def create_model_and_optimizer(lr_1, lr_2):
    model = torch.nn.Linear(2, 1)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(
        [
            {
                "params": params[0],
            },
            {"params": params[1], "lr": lr_2},
        ],
        lr=lr_1,
    )
    return model, optimizer
