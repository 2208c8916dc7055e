"""What a served checkpoint holds, and checks on weight updates before anything changes.

Pure (safetensors headers + json, no vLLM). :class:`WeightTable` knows every tensor the model
accepts -- the checkpoint's own (HF names) plus one predictor per MoE layer -- with shape and
dtype; :meth:`WeightTable.check` refuses an update with an unknown name, a wrong shape or a
non-floating dtype, naming the tensor; :func:`check_finite` refuses NaN/±Inf values, naming the
tensor and how many values are bad (every way weights arrive goes through
:meth:`WeightTable.stage`, which runs both). Floating dtypes other than the checkpoint's are
accepted and cast by the loader (a trainer in fp32 may push to a bf16 server).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

FLOAT_DTYPES = {"F32", "BF16", "F16", "F64"}
_TORCH_TO_ST = {
    "torch.float32": "F32",
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float64": "F64",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def predictor_name(layer: int) -> str:
    """Checkpoint name of decoder layer ``layer``'s evolution predictor weight ``[E, H]``."""
    return f"model.layers.{layer}.mlp.predictor.weight"


class WeightValidationError(ValueError):
    """An update that must not be applied; the message names the offending tensor."""


class NonFiniteWeightsError(WeightValidationError):
    """An update with NaN or ±Inf values (the message names each bad tensor and its count)."""


class CanaryError(WeightValidationError):
    """Applied weights failed the canary generate (non-finite log-probs, invalid routes...):
    the previous weights were restored and the update refused."""


class StaleVersionError(WeightValidationError):
    """An update whose version is not greater than the one being served (HTTP 409 /
    gRPC FAILED_PRECONDITION): versions only ever increase."""


def require_newer(version: int, current: int) -> None:
    """The version rule, for every way weights arrive: ``version`` must exceed ``current``."""
    if version <= current:
        raise StaleVersionError(f"weight version {version} must be greater than {current}")


FINITE_CHUNK = 1 << 24  # elements checked at once (bounds the temporary mask)


def non_finite_counts(t) -> tuple[int, int]:
    """``(NaN count, ±Inf count)`` of a tensor, in chunks; ``(0, 0)`` after one summing pass
    when the tensor is finite (the common case)."""
    import torch

    flat = t.detach().reshape(-1)
    if not flat.is_floating_point():
        return 0, 0
    nan = inf = 0
    for chunk in flat.split(FINITE_CHUNK):
        # a finite sum means every value is finite (NaN and ±Inf propagate); a sum that is
        # not (overflow included) falls back to counting exactly. ~5x cheaper than isfinite
        if bool(torch.isfinite(chunk.sum())):
            continue
        n = int(torch.isnan(chunk).sum())
        nan, inf = nan + n, inf + int((~torch.isfinite(chunk)).sum()) - n
    return nan, inf


def check_finite(tensors) -> None:
    """Raise :class:`NonFiniteWeightsError` naming every ``(name, tensor)`` with NaN/±Inf
    values and how many (all are checked, so one refusal lists them all)."""
    bad = []
    for name, t in tensors:
        nan, inf = non_finite_counts(t)
        if nan or inf:
            bad.append(
                f"{name}: {nan + inf} of {t.numel()} values are not finite ({nan} NaN, {inf} Inf)"
            )
    if bad:
        more = f" (and {len(bad) - 3} more tensors)" if len(bad) > 3 else ""
        raise NonFiniteWeightsError("; ".join(bad[:3]) + more)


def file_tensors(path: str | Path, names: Iterable[str]):
    """``(name, tensor)`` of ``names`` in a safetensors file, one at a time, each read into its
    own memory (:mod:`pr2_serve.core.tensor_files`: the pass does not map the whole file)."""
    from pr2_serve.core.tensor_files import iter_tensors

    names = list(names)
    yield from iter_tensors(dict.fromkeys(names, str(path)))


@dataclass(frozen=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, BF16, ...


def st_dtype(dtype) -> str:
    """safetensors dtype name of a torch dtype (or pass a safetensors name through)."""
    s = str(dtype)
    return _TORCH_TO_ST.get(s, s)


def _index_map(model_dir: Path) -> dict[str, str] | None:
    """``weight_map`` of a sharded checkpoint's ``model.safetensors.index.json`` (None: no
    index)."""
    index = model_dir / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"] if index.exists() else None


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files that hold a checkpoint directory's weights, the one rule for
    every reader (the engine, the trainer, ``POST /v1/weights/load``).

    As transformers reads one: the files of ``model.safetensors.index.json``, else
    ``model.safetensors`` alone (a ``pr2-train`` ``checkpoint-N`` keeps its optimizer and RNG
    states in other ``.safetensors`` files beside it), else every ``*.safetensors`` of the
    folder. FileNotFoundError if there are none."""
    model_dir = Path(model_dir)
    if (weight_map := _index_map(model_dir)) is not None:
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    files = [single] if single.exists() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return files


def checkpoint_files(model_dir: str | Path) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of a HF checkpoint (single file or sharded), its
    files chosen by :func:`weight_files`."""
    model_dir = Path(model_dir)
    if (weight_map := _index_map(model_dir)) is not None:
        return {name: str(model_dir / f) for name, f in weight_map.items()}
    files = weight_files(model_dir)
    from safetensors import safe_open

    out: dict[str, str] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update({name: str(path) for name in f.keys()})  # noqa: SIM118
    return out


def read_specs(files: dict[str, str]) -> dict[str, TensorSpec]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    specs = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                specs[name] = TensorSpec(tuple(sl.get_shape()), sl.get_dtype())
    return specs


class WeightTable:
    """The tensors a served model accepts: ``{name: TensorSpec}``."""

    def __init__(self, specs: dict[str, TensorSpec]) -> None:
        self.specs = specs

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> WeightTable:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        specs = read_specs(checkpoint_files(model_dir))
        num_experts = config_num_experts(config)
        float_dtypes = [s.dtype for s in specs.values() if s.dtype in FLOAT_DTYPES]
        dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else "F32"
        for layer in moe_layer_indices(config):
            specs.setdefault(
                predictor_name(layer), TensorSpec((int(num_experts), config["hidden_size"]), dtype)
            )
        return cls(specs)

    def predictor_names(self) -> list[str]:
        return [n for n in self.specs if n.endswith(".mlp.predictor.weight")]

    def predictor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self.specs[n].shape for n in self.predictor_names()}

    def with_zero_predictors(self, files: dict[str, str], folder: Path) -> dict[str, str]:
        """``files`` with every predictor it lacks mapped to a file of zeros (written once into
        ``folder``): a complete weight set to reload, where "absent" must mean zero."""
        missing = [n for n in self.predictor_names() if n not in files]
        if not missing:
            return dict(files)
        import torch
        from safetensors.torch import save_file

        path = Path(folder) / "zero-predictors.safetensors"
        if not path.exists():
            dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
            zeros = {
                n: torch.zeros(self.specs[n].shape, dtype=dtypes.get(self.specs[n].dtype))
                for n in self.predictor_names()
            }
            tmp = path.with_suffix(".tmp")
            save_file(zeros, str(tmp))
            tmp.replace(path)
        return {**files, **dict.fromkeys(missing, str(path))}

    def check(self, name: str, shape: Iterable[int], dtype) -> None:
        """Raise :class:`WeightValidationError` unless ``name`` may take this shape/dtype."""
        spec = self.specs.get(name)
        if spec is None:
            raise WeightValidationError(f"unknown tensor name {name!r}")
        shape = tuple(int(s) for s in shape)
        if shape != spec.shape:
            raise WeightValidationError(
                f"{name}: shape {list(shape)} != expected {list(spec.shape)}"
            )
        dt = st_dtype(dtype)
        if dt not in FLOAT_DTYPES:
            raise WeightValidationError(
                f"{name}: dtype {dt} is not a floating dtype ({spec.dtype})"
            )

    def check_file(self, path: str | Path) -> list[str]:
        """Check every tensor of a safetensors file (headers only); return the names."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    sl = f.get_slice(name)
                    self.check(name, sl.get_shape(), sl.get_dtype())
        except WeightValidationError:
            raise
        except Exception as e:  # not a safetensors file, truncated header...
            raise WeightValidationError(f"not a readable safetensors file: {e}") from e
        if not names:
            raise WeightValidationError("empty update")
        return names

    def stage(self, weights, staging_dir: Path, version: int) -> dict[str, str]:
        """Check an update (``{name: tensor}`` or a safetensors file: names, shapes, dtypes,
        then every value finite) and return ``{name: file}`` (tensors are written to a file in
        ``staging_dir`` first)."""
        if not isinstance(weights, Mapping):
            path = str(Path(weights).resolve())
            names = self.check_file(path)
            check_finite(file_tensors(path, names))
            return dict.fromkeys(names, path)
        if not weights:
            raise WeightValidationError("empty update")
        for name, t in weights.items():
            self.check(name, t.shape, t.dtype)
        check_finite(weights.items())
        from safetensors.torch import save_file

        path = Path(staging_dir) / f"update-v{version}-{uuid.uuid4().hex[:8]}.safetensors"
        save_file({n: t.detach().cpu().contiguous() for n, t in weights.items()}, str(path))
        return dict.fromkeys(weights, str(path))


def config_num_experts(config: dict) -> int:
    """Routed experts per MoE layer, from a config.json dict (each family names it its own
    way: Qwen ``num_experts``, Mixtral / GPT-OSS ``num_local_experts``, DeepSeek-V3 / GLM-4.5
    ``n_routed_experts``; shared experts are not routed)."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    raise KeyError("config.json names no expert count")


def moe_layer_indices(config: dict) -> list[int]:
    """Decoder layers with an MoE block, from a config.json dict (Qwen rules; DeepSeek-V3 and
    GLM-4.5: dense below ``first_k_dense_replace``; Mixtral, OLMoE, GPT-OSS: every layer)."""
    step = config.get("decoder_sparse_step", 1) or 1
    dense = set(config.get("mlp_only_layers", []) or [])
    first = config.get("first_k_dense_replace", 0) or 0
    freq = config.get("moe_layer_freq", 1) or 1
    n = config["num_hidden_layers"]
    return [
        i
        for i in range(n)
        if i not in dense and (i + 1) % step == 0 and i >= first and i % freq == 0
    ]
