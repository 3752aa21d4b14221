"""torch.optim.LBFGS, made without importing torch._dynamo.

torch.optim marks Optimizer.add_param_group and zero_grad (and state_dict, load_state_dict) as
not to be compiled with torch._disable_dynamo, which imports torch._dynamo the first time one of
them runs: ~2 s of a new process on a 2-core CPU, a quarter of a small build in a fresh worker,
spent on a compiler NanoStream never runs. The decorator looks for the function's own
"__dynamo_disable" before it imports anything; giving each method itself there makes the
decorated method call the plain one. If a torch release drops the attribute or the __wrapped__
link, nothing breaks: the import simply happens again (tests/test_train.py notices).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def _skip_dynamo_import() -> None:
    for name in _METHODS:
        method = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if method is not None and not hasattr(method, "__dynamo_disable"):
            setattr(method, "__dynamo_disable", method)


_skip_dynamo_import()


def lbfgs(params: Iterable[torch.Tensor], **options) -> torch.optim.LBFGS:
    """torch.optim.LBFGS(params, **options); this module's import made it dynamo-free."""
    return torch.optim.LBFGS(params, **options)
