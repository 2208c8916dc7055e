"""An optimizer's state on disk without pickle: its tensors as safetensors, the rest as JSON.

``<name>.safetensors`` holds every tensor of ``state_dict()["state"]`` under
``"<param index>.<key>"`` (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``); ``<name>.json`` holds the
``param_groups`` and any non-tensor state values. Loading rebuilds the same ``state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["load_optimizer_state", "optimizer_files", "save_optimizer_state"]


def optimizer_files(stem: Path) -> tuple[Path, Path]:
    """The two files of the optimizer state named ``stem`` (``dir/optimizer``)."""
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_optimizer_state(opt: torch.optim.Optimizer, stem: Path) -> None:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, values = {}, {}
    for idx, state in sd["state"].items():
        for key, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{key}"] = v.detach().cpu().contiguous()
            else:
                values[f"{idx}.{key}"] = v
    st, meta = optimizer_files(stem)
    save_file(tensors, str(st))
    meta.write_text(json.dumps({"param_groups": sd["param_groups"], "values": values}))


def load_optimizer_state(opt: torch.optim.Optimizer, stem: Path) -> None:
    from safetensors.torch import load_file

    st, meta_path = optimizer_files(stem)
    meta = json.loads(meta_path.read_text())
    state: dict[int, dict] = {}
    for name, v in [*load_file(str(st)).items(), *meta["values"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
