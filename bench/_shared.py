"""What the bench scripts share: the repo root, a device-synchronised clock, a timer of module
forwards, and a profile's settings (params.yaml, with configs/demo.yaml on top for demo)."""

from __future__ import annotations

import functools
import time

import torch

from components.config import Params, parse_params
from flows.common import profile_settings


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ForwardTimer:
    """Wall seconds inside the forwards of named module groups (forward pre / post hooks)."""

    def __init__(self, groups: dict[str, list[torch.nn.Module]], device: torch.device) -> None:
        self.seconds = dict.fromkeys(groups, 0.0)
        self.device = device
        self._start: dict[int, float] = {}
        for name, modules in groups.items():
            for module in modules:
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(functools.partial(self._post, name))

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        self._start[id(module)] = clock(self.device)

    def _post(self, name: str, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.seconds[name] += clock(self.device) - self._start.pop(id(module))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def load_params(profile: str) -> Params:
    """params.yaml (+ configs/demo.yaml for the demo profile)."""
    raw = profile_settings(profile)
    raw["models"]["profile"] = profile
    return parse_params(raw)
