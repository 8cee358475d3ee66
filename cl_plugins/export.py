"""Taking a trained model away from the plugin.

- :func:`merge_and_unload`: LoRA and PEGO groups are folded into the weights they adapt and their
  wrappers removed, so ``model.state_dict()`` has exactly the keys of the model before injection
  and loads into the user's unmodified model class. LoRAMoE and L2M compute their update from the
  input (a router, a per-sample selection), so no fixed weight holds it: they are refused with an
  error that points to :func:`save_adapters`.
- :func:`save_adapters` / :func:`load_adapters`: a file holding only the adapters' state, the
  classification head and what re-injection needs (the method, each adapted layer and its settings,
  L2M's pool and how its query is computed). :func:`load_adapters` re-injects into a freshly built
  model, without a Trainer, and reproduces the saved model's predictions. The file holds tensors
  and plain Python types only, so it loads with ``torch.load(..., weights_only=True)``.

Both take the module the adapters were injected into: the LightningModule a callback ran on (its
record of injections is kept in step), or a plain ``nn.Module`` for the plain-torch functions.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import Tensor, nn

from cl_plugins.peft.adapters import (
    INJECTED,
    INJECTED_PARAMS,
    AdapterLayer,
    NotMergeableError,
    adapter_layers,
    forget_injections,
    inject_adapters,
    refuse_adapted,
)
from cl_plugins.peft.l2m import ModulationPool, PooledIA3Linear, PooledLoRALinear, QueryHooks
from cl_plugins.peft.lora import LoRAGroupLinear
from cl_plugins.peft.loramoe import LoRAMoELinear
from cl_plugins.peft.targets import freeze_parameters, set_submodule
from cl_plugins.protocols import find_head

#: the ``format`` entry of an adapter file
FORMAT = "cl_plugins.adapters"
#: the layout version this code writes and reads
VERSION = 1

PathLike = str | os.PathLike | IO[bytes]


# ---------------------------------------------------------------------- merging
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every adapter of ``model`` into its base layer and puts the plain layer back; returns ``model``.

    Afterwards ``model.state_dict()`` has exactly the keys it had before injection, with the merged
    weights, and the model computes what the adapted model computed (up to one rounding of each
    merged weight). Parameters keep their ``requires_grad`` flags (the backbone stays frozen).
    Injections merged away are dropped from the module's record, so a later ``fit`` with the same
    callback injects fresh adapters on top of the merged weights; hooks a callback registered on a
    removed wrapper (PEGO's) no longer run.

    Raises :class:`~cl_plugins.peft.adapters.NotMergeableError`, leaving the model unchanged, when
    an adapter cannot be merged (LoRAMoE, L2M), and ``ValueError`` when the model has no adapter.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no adapter layers to merge (a Hugging Face PEFT model has its own "
            "merge_and_unload())"
        )
    blocked: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for name, layer in layers.items():
        if not layer.mergeable:
            method = layer.adapter_method or type(layer).__name__
            blocked.setdefault(method, []).append(name)
            reasons[method] = layer.unmergeable_reason
    if blocked:
        what = "; ".join(f"{m} ({len(n)} layers, e.g. '{n[0]}'): {reasons[m]}" for m, n in blocked.items())
        raise NotMergeableError(
            f"merge_and_unload cannot merge {what}, so the update depends on the input and no "
            "fixed weight can hold it. Keep the adapters instead: save_adapters(model, 'adapters.pt') writes them "
            "and load_adapters(fresh_model, 'adapters.pt') rebuilds the adapted model without a Trainer"
        )
    for name, layer in layers.items():
        set_submodule(model, name, layer.merge_and_unwrap())
    forget_injections(model, layers)
    return model


# ---------------------------------------------------------------------- describing adapters
def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _index(index: Tensor | None) -> Tensor | None:
    return None if index is None else index.detach().cpu().clone()


def _describe(name: str, layer: AdapterLayer, pools: Mapping[int, str]) -> dict[str, Any]:
    """What rebuilding ``layer`` on its base layer needs, in plain types and tensors."""
    base = layer.base_layer
    cfg: dict[str, Any] = {"type": type(layer).__name__, "method": layer.adapter_method or type(layer).__name__,
                           "in_features": base.in_features, "out_features": base.out_features}
    if isinstance(layer, LoRAGroupLinear):
        cfg.update(num_loras=layer.num_loras, rank=layer.rank, alpha=layer.alpha, dropout=_dropout_p(layer.dropout),
                   parts=[[n, s, e] for n, (s, e) in zip(layer.part_names, layer.row_ranges)], merged=layer.merged)
    elif isinstance(layer, LoRAMoELinear):
        ex = layer.experts
        cfg.update(num_experts=ex.num_experts, rank=ex.rank, alpha=ex.alpha, dropout=_dropout_p(ex.dropout),
                   per_expert_dropout=ex.per_expert_dropout, expert_groups=layer.expert_groups.tolist())
    elif isinstance(layer, (PooledLoRALinear, PooledIA3Linear)):
        pool = layer.pool[0]
        if id(pool) not in pools:
            raise ValueError(f"the L2M layer '{name}' uses a pool that is not a module of the model passed to "
                             "save_adapters: pass the module that holds the pool (the LightningModule)")
        cfg["pool"] = pools[id(pool)]
        if isinstance(layer, PooledLoRALinear):
            cfg.update(rank=layer.rank, alpha=layer.alpha, index=_index(layer.out_index))
        else:
            cfg.update(side=layer.side, index=_index(layer.index))
    else:
        raise TypeError(f"save_adapters does not know how to save a {type(layer).__name__} (at '{name}')")
    return cfg


def _describe_pool(model: nn.Module, name: str, pool: ModulationPool) -> dict[str, Any]:
    """The pool's settings and how its query is computed (qualified names of the hooked modules)."""
    hooks = pool.query_hooks
    if hooks is None:
        raise ValueError(
            f"the L2M pool '{name}' has no query hooks installed, so the file could not say how queries are "
            "computed: save a model set up by the L2M callback, or install QueryHooks(...) first"
        )
    names = {id(m): n for n, m in model.named_modules()}

    def where(module: nn.Module | None, what: str) -> str | None:
        if module is None:
            return None
        if id(module) not in names:
            raise ValueError(f"L2M's {what} ({type(module).__name__}) is not a module of the model passed to "
                             "save_adapters: pass the module that holds it (the LightningModule)")
        return names[id(module)]

    embedding = hooks.mode == "embedding"
    return {
        "pool_size": pool.pool_size, "key_dim": pool.key_dim, "top_k": pool.top_k,
        "key_loss_weight": pool.key_loss_weight, "query": hooks.mode, "root": where(hooks.root, "query root"),
        "query_module": where(hooks.query_module, "query module") if embedding else None,
        "query_tap": where(hooks.query_tap, "query tap") if embedding else None,
        "head": where(hooks.head, "head") if not embedding else None, "pad_token_id": hooks.pad_token_id,
    }


def _head(model: nn.Module, head: bool | str) -> tuple[str, nn.Module] | None:
    if head is False:
        return None
    try:
        return find_head(model, head if isinstance(head, str) else None)
    except ValueError as err:
        raise ValueError(f"{err}. save_adapters stores the head with the adapters: name it with head='<qualified "
                         "name>', or pass head=False to leave it out") from err


def adapter_state(model: nn.Module, head: bool | str = True) -> dict[str, Any]:
    """What :func:`save_adapters` writes, as a dictionary (see there)."""
    layers = adapter_layers(model)
    pools = {n: m for n, m in model.named_modules() if isinstance(m, ModulationPool)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers to save: inject them first (e.g. train with "
                         "the LoRA / PEGO / LoRAMoE / L2M callback)")
    pool_names = {id(m): n for n, m in pools.items()}
    state: dict[str, Tensor] = {}
    trainable: list[str] = []

    def keep(prefix: str, module: nn.Module, skip: tuple[str, ...] = ()) -> None:
        params = {k for k, p in module.named_parameters() if p.requires_grad}
        for k, v in module.state_dict().items():
            if k.startswith(skip):
                continue
            state[f"{prefix}.{k}"] = v.detach().cpu().clone()
            if k in params:
                trainable.append(f"{prefix}.{k}")

    described = {}
    for name, layer in layers.items():
        described[name] = _describe(name, layer, pool_names)
        keep(name, layer, skip=("base.", "lora_merged"))
    pool_cfg = {}
    for name, pool in pools.items():
        pool_cfg[name] = _describe_pool(model, name, pool)
        keep(name, pool)
    found = _head(model, head)
    head_name = None
    if found is not None:
        head_name, head_module = found
        if head_name in layers or any(head_name.startswith(n + ".") for n in layers):
            raise ValueError(f"the head '{head_name}' is adapted itself: pass head=False (its adapter is saved)")
        keep(head_name, head_module)
    saved = set(state)
    left = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
    if left:
        warnings.warn(
            f"save_adapters saves the adapters and the head only; {len(left)} other trainable parameter tensors "
            f"(e.g. {left[:3]}) are not in the file: save model.state_dict() too if they were trained",
            stacklevel=3,
        )
    return {
        "format": FORMAT, "version": VERSION,
        "methods": sorted({cfg["method"] for cfg in described.values()}),
        "layers": described, "pools": pool_cfg, "head": head_name, "trainable": trainable,
        "injected": {k: list(v) for k, v in model.__dict__.get(INJECTED, {}).items()},
        "injected_params": {k: list(v) for k, v in model.__dict__.get(INJECTED_PARAMS, {}).items()},
        "state": state,
    }


def save_adapters(model: nn.Module, path: PathLike, head: bool | str = True) -> None:
    """Writes the adapters of ``model`` (and its head) to ``path``.

    The file holds every adapter's own parameters and buffers (not the frozen base layers), the
    classification head (``head=True``: found by :func:`cl_plugins.protocols.find_head`; a string
    names it; ``False`` leaves it out), L2M's pool keys, and the settings :func:`load_adapters` needs
    to re-inject: the method, each adapted layer with its shape, rank, alpha, experts, fused-qkv
    slices, the pool size and the modules its query hooks sit on. Merged LoRA / PEGO groups are saved
    as factors and merged again on load. A warning lists trainable parameters outside the adapters
    and the head (they are not saved). Typical use, after ``trainer.fit(module, ...)`` with an
    injection callback: ``save_adapters(module, "adapters.pt")``.
    """
    torch.save(adapter_state(model, head), path)


# ---------------------------------------------------------------------- loading
def _read(source: PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        payload: Any = source
    else:
        try:
            payload = torch.load(source, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(
                f"could not read an adapter file from {source!r} with torch.load(weights_only=True): {err}. "
                "load_adapters reads files written by cl_plugins.export.save_adapters"
            ) from err
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{source!r} is not an adapter file written by cl_plugins.export.save_adapters (a Lightning checkpoint "
            "or a state_dict loads with model.load_state_dict; a PEFT adapter with PeftModel.from_pretrained)"
        )
    if payload.get("version") != VERSION:
        raise ValueError(f"the adapter file has layout version {payload.get('version')}; this code reads {VERSION}")
    return payload


def _check_architecture(model: nn.Module, payload: Mapping[str, Any]) -> None:
    """Every target, hooked module and head of the file exists in ``model`` with the saved shapes."""
    modules = dict(model.named_modules())
    layers: Mapping[str, Mapping[str, Any]] = payload["layers"]
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(
            f"{type(model).__name__} lacks {len(missing)} of the {len(layers)} layers the file's adapters target "
            f"(e.g. {missing[:3]}): load them into the same architecture, passing the same kind of module that "
            "save_adapters got (the LightningModule, or the bare network)"
        )
    refuse_adapted(model, set(layers).__contains__, "load_adapters",
                   hint="load_adapters re-injects the saved adapters: call it on a freshly built model")
    wrong = {n: f"{type(modules[n]).__name__}" + (f"({modules[n].in_features} -> {modules[n].out_features})"
                                                  if isinstance(modules[n], nn.Linear) else "")
             for n, c in layers.items()
             if not isinstance(modules[n], nn.Linear)
             or (modules[n].in_features, modules[n].out_features) != (c["in_features"], c["out_features"])}
    if wrong:
        saved = {n: f"Linear({layers[n]['in_features']} -> {layers[n]['out_features']})" for n in wrong}
        raise ValueError(f"the model's layers {wrong} differ from the ones the adapters were trained on {saved}: "
                         "load them into the same architecture")
    for name, cfg in payload["pools"].items():
        if hasattr(model, name):
            raise ValueError(f"{type(model).__name__} already has an attribute '{name}' (an L2M pool): load the "
                             "adapters into a freshly built model")
        for key in ("root", "query_module", "query_tap", "head"):
            if cfg[key] is not None and cfg[key] not in modules:
                raise ValueError(f"the file's L2M {key.replace('_', ' ')} '{cfg[key]}' is not a module of "
                                 f"{type(model).__name__}: load into the same architecture")
    head = payload["head"]
    if head is not None:
        if head not in modules:
            raise ValueError(f"the file holds the head '{head}', which {type(model).__name__} does not have")
        own = modules[head].state_dict()
        for key, value in payload["state"].items():
            if key.startswith(head + ".") and key[len(head) + 1:] in own:
                here = own[key[len(head) + 1:]]
                if here.shape != value.shape:
                    raise ValueError(
                        f"the head '{key}' has shape {tuple(here.shape)} here but {tuple(value.shape)} in the file: "
                        "build the model with the same number of classes"
                    )


def _build(cfg: Mapping[str, Any], base: nn.Linear, pools: Mapping[str, ModulationPool], name: str) -> AdapterLayer:
    kind = cfg["type"]
    if kind == "LoRAGroupLinear":
        return LoRAGroupLinear(base, num_loras=cfg["num_loras"], rank=cfg["rank"], alpha=cfg["alpha"],
                               dropout=cfg["dropout"], parts=[tuple(p) for p in cfg["parts"]])
    if kind == "LoRAMoELinear":
        return LoRAMoELinear(base, cfg["num_experts"], cfg["rank"], cfg["alpha"], cfg["dropout"],
                             expert_groups=cfg["expert_groups"], per_expert_dropout=cfg["per_expert_dropout"])
    index = cfg["index"]
    index = None if index is None else index.to(base.weight.device)
    if kind == "PooledLoRALinear":
        return PooledLoRALinear(base, pools[cfg["pool"]], rank=cfg["rank"], alpha=cfg["alpha"], out_index=index,
                                name=name)
    if kind == "PooledIA3Linear":
        return PooledIA3Linear(base, pools[cfg["pool"]], side=cfg["side"], index=index, name=name)
    raise ValueError(f"the adapter file holds a layer of unknown type {kind!r} at '{name}'")


def load_adapters(model: nn.Module, source: PathLike | Mapping[str, Any], method: str | None = None) -> nn.Module:
    """Re-injects the adapters saved by :func:`save_adapters` into ``model`` and loads their state; returns it.

    ``model`` is freshly built with the same architecture and pretrained weights as the one saved
    (the same kind of module: the LightningModule or the bare network); no Trainer is needed. The
    adapted model then computes what the saved one did. Afterwards only the parameters that were
    trainable when saved are trainable (the backbone is frozen), and a LightningModule records the
    injections again, so training on with the same callback continues from the loaded adapters.
    ``method`` (e.g. ``"PEGO"``) refuses a file holding another method's adapters. Raises a clear
    ``ValueError`` for a file that is not an adapter file, layers the model does not have or with
    other shapes, a head of another size, or layers another adapter already holds; the model is
    left unchanged in these cases.
    """
    payload = _read(source)
    methods = list(payload["methods"])
    if method is not None and methods != [method]:
        raise ValueError(f"the adapter file holds {' + '.join(methods)} adapters, not {method}: load it without "
                         f"method= or pick the file written for {method}")
    _check_architecture(model, payload)
    layers: Mapping[str, Mapping[str, Any]] = payload["layers"]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    pools = {name: ModulationPool(cfg["pool_size"], cfg["key_dim"], cfg["top_k"], cfg["key_loss_weight"]).to(device)
             for name, cfg in payload["pools"].items()}
    for tag in methods:
        names = [n for n, c in layers.items() if c["method"] == tag]
        inject_adapters(model, lambda n, base, rows: _build(layers[n], base, pools, n), dict.fromkeys(names),
                        method=tag)
    modules = dict(model.named_modules())
    for name, pool in pools.items():
        model.add_module(name, pool)
        pool.state.layer_names = [n for n, c in layers.items() if c.get("pool") == name]
        cfg = payload["pools"][name]

        def get(key: str, cfg: Mapping[str, Any] = cfg) -> nn.Module | None:
            return None if cfg[key] is None else modules[cfg[key]]

        QueryHooks(pool, get("root"), cfg["query"], get("query_module"), get("head"), cfg["pad_token_id"],
                   query_tap=get("query_tap")).install()
    _load_state(model, payload["state"])
    for name, cfg in layers.items():
        if cfg["type"] == "LoRAGroupLinear" and cfg["merged"]:
            model.get_submodule(name).merge()
    freeze_parameters(model)
    trainable = set(payload["trainable"])
    for n, p in model.named_parameters():
        if n in trainable:
            p.requires_grad_(True)
    for attr, key in ((INJECTED, "injected"), (INJECTED_PARAMS, "injected_params")):
        if payload[key]:
            model.__dict__.setdefault(attr, {}).update({k: list(v) for k, v in payload[key].items()})
    return model


def _load_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Loads ``state`` (adapter and head tensors) into ``model`` (cast to the model's dtypes)."""
    own = model.state_dict(keep_vars=True)
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"the adapter file holds tensors the re-injected model does not have (e.g. {unknown[:3]}): "
                         "the file does not match this code's adapters")
    for key, value in state.items():
        here = own[key]
        if here.shape != value.shape:
            raise ValueError(f"'{key}' has shape {tuple(here.shape)} in the model but {tuple(value.shape)} in the file")
    result = model.load_state_dict(dict(state), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected tensors in the adapter file: {result.unexpected_keys[:5]}")
