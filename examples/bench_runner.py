"""One benchmark runner, one table: methods x streams x seeds from a YAML config.

Each run trains a whole stream, either through one Lightning ``fit`` with our callbacks or through
Avalanche 0.6's own loop with one of its strategies (``examples/peers.py``), and is scored the same
way. The table holds, per stream and method, mean ± std over seeds of the final average accuracy,
average forgetting and BWT, the mean wall time and its ratio to the stream's ``naive`` row, the
peak memory the run added and the trainable parameters. Every run writes ``metrics.json`` and its
accuracy-matrix heatmap under ``<output_dir>/<config>/<stream>/<method>/seed<k>/``.

    python examples/bench_runner.py examples/configs/peers.yaml --markdown BENCHMARKS.md

Config (see ``examples/configs/peers.yaml``)::

    seeds: [0, 1, 2]
    streams:
      Split-MNIST:
        datamodule: {class_path: datamodules.SplitMNIST, init_args: {n_experiences: 5, batch_size: 32}}
        model: {backbone: small_cnn, num_classes: 10, in_channels: 1, lr: 0.05}   # ContinualClassifier
        params: {buffer_size: 500}          # "@buffer_size" in a method's arguments reads this
        trainer: {}                         # extra Trainer arguments (precision, accelerator, ...)
        methods: [naive, ER]                # optional: a subset of the methods below
    methods:
      naive: {}
      ER: {callbacks: [{class_path: callbacks.ExperienceReplay, init_args: {buffer_size: "@buffer_size"}}]}
      Avalanche Replay: {avalanche: Replay, args: {mem_size: "@buffer_size"}}

Runs go seed by seed, all methods of a stream in turn, so drifts in machine load hit every method
alike. Each run is a forked child process (Linux), its output in ``run.log`` beside the heatmap:
its peak memory is its own (``VmHWM`` reset through ``/proc/self/clear_refs``; on CUDA
``max_memory_allocated``), and no run inherits another's allocator state. ``--in-process`` runs them
in this process instead (memory column then "-").
With ``--markdown FILE`` the table replaces the block between ``<!-- bench_runner:<config>:begin -->``
and ``<!-- bench_runner:<config>:end -->`` in FILE (appended when absent).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.metrics import plot_matrix  # noqa: E402
from cl_plugins import ContinualClassifier  # noqa: E402
from examples.benchutils import code_revision as _code_revision  # noqa: E402
from examples.benchutils import markdown_table, mean_std, run_stream  # noqa: E402
from examples.peers import STRATEGIES, check_peer, run_peer  # noqa: E402

TOP_KEYS = {"seeds", "threads", "output_dir", "streams", "methods", "published"}
STREAM_KEYS = {"datamodule", "model", "params", "trainer", "methods", "device"}
METHOD_KEYS = {"callbacks", "avalanche", "args", "model", "trainer"}
REFERENCE = "naive"


class BenchConfigError(ValueError):
    """A benchmark config that cannot run; the message says what to change."""


# ---------------------------------------------------------------------------- config
def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("minilm"):  # ${minilm:} -> the local all-MiniLM-L6-v2 folder
        from datamodules.text import default_tokenizer_path

        # omegaconf 2.4 renamed register_new_resolver (now deprecated) to register_resolver
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register("minilm", default_tokenizer_path)


def load_config(path: str | Path) -> dict[str, Any]:
    """Reads and checks a runner config (YAML; omegaconf interpolation, ``${minilm:}`` for the local
    MiniLM folder)."""
    _register_resolvers()
    path = Path(path)
    if not path.is_file():
        raise BenchConfigError(f"no benchmark config at {path}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise BenchConfigError(f"{path}: the config must be a mapping with 'streams' and 'methods'")
    check_config(cfg, str(path))
    return cfg


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    extra = set(keys) - allowed
    if extra:
        raise BenchConfigError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")


def check_config(cfg: dict[str, Any], where: str = "config") -> None:
    """Every structural mistake is reported before the first run starts."""
    _unknown(cfg, TOP_KEYS, where)
    streams, methods = cfg.get("streams"), cfg.get("methods")
    if not isinstance(streams, dict) or not streams:
        raise BenchConfigError(f"{where}: 'streams' must map stream names to stream specs")
    if not isinstance(methods, dict) or not methods:
        raise BenchConfigError(f"{where}: 'methods' must map method names to method specs")
    seeds = cfg.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise BenchConfigError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    for name, spec in methods.items():
        spec = spec or {}
        _unknown(spec, METHOD_KEYS, f"{where}: method {name!r}")
        if "avalanche" in spec and "callbacks" in spec:
            raise BenchConfigError(f"{where}: method {name!r} has both 'avalanche' and 'callbacks': "
                                   "a run is either one of ours (callbacks) or an Avalanche strategy")
        if "avalanche" in spec and spec["avalanche"] not in STRATEGIES:
            raise BenchConfigError(f"{where}: method {name!r}: unknown Avalanche strategy {spec['avalanche']!r}; "
                                   f"choose one of {sorted(STRATEGIES)}")
        if "args" in spec and "avalanche" not in spec:
            raise BenchConfigError(f"{where}: method {name!r}: 'args' are an Avalanche strategy's arguments; "
                                   "our callbacks take theirs under callbacks[i].init_args")
        if not isinstance(spec.get("trainer", {}), dict):
            raise BenchConfigError(f"{where}: method {name!r}: 'trainer' must map Trainer arguments to values that "
                                   f"override the stream's (e.g. {{gradient_clip_val: 1.0}}), got {spec['trainer']!r}")
        if not isinstance(spec.get("model", {}), dict):
            raise BenchConfigError(f"{where}: method {name!r}: 'model' must map ContinualClassifier arguments to "
                                   f"values that override the stream's (e.g. {{lr: 0.01}}), got {spec['model']!r}")
        for cb in spec.get("callbacks", []) or []:
            if not isinstance(cb, dict) or "class_path" not in cb:
                raise BenchConfigError(f"{where}: method {name!r}: each callback needs a class_path "
                                       f"(and optional init_args), got {cb!r}")
    check_published(cfg.get("published"), streams, methods, where)
    for kind, names in (("streams", streams), ("methods", methods)):
        folders: dict[str, str] = {}
        for n in names:
            folder = _slug(n)
            if folder in folders:
                raise BenchConfigError(f"{where}: {kind} {folders[folder]!r} and {n!r} would write into the same run "
                                       f"folder {folder!r}; rename one")
            folders[folder] = n
    for sname, s in streams.items():
        _unknown(s, STREAM_KEYS, f"{where}: stream {sname!r}")
        if "datamodule" not in s or "class_path" not in (s["datamodule"] or {}):
            raise BenchConfigError(f"{where}: stream {sname!r} needs datamodule.class_path")
        unknown = [m for m in s.get("methods", []) or [] if m not in methods]
        if unknown:
            raise BenchConfigError(f"{where}: stream {sname!r} lists unknown method(s) {unknown}; "
                                   f"the config defines {list(methods)}")
        for m in stream_methods(cfg, sname):
            substitute(methods[m] or {}, s.get("params", {}) or {}, f"{where}: stream {sname!r}, method {m!r}")


def check_published(published: Any, streams: dict[str, Any], methods: dict[str, Any], where: str) -> None:
    """``published: {source: <citation>, results: {<stream>: {<method>: {avg_acc: [mean, std], ...}}}}``, in %."""
    if published is None:
        return
    if not isinstance(published, dict):
        raise BenchConfigError(f"{where}: 'published' must be a mapping with 'source' and 'results'")
    _unknown(published, {"source", "results"}, f"{where}: published")
    for sname, per_method in (published.get("results") or {}).items():
        if sname not in streams:
            raise BenchConfigError(f"{where}: published results for unknown stream {sname!r}")
        for mname, values in (per_method or {}).items():
            if mname not in methods:
                raise BenchConfigError(f"{where}: published results for unknown method {mname!r} of {sname!r}")
            _unknown(values or {}, set(PUBLISHED_METRICS), f"{where}: published {sname!r} / {mname!r}")
            for metric, v in (values or {}).items():
                ok = isinstance(v, (int, float)) or (isinstance(v, list) and 1 <= len(v) <= 2 and
                                                     all(isinstance(x, (int, float)) for x in v))
                if not ok:
                    raise BenchConfigError(f"{where}: published {sname!r} / {mname!r} / {metric}: give a number or "
                                           f"[mean, std] in %, got {v!r}")


def stream_methods(cfg: dict[str, Any], stream: str) -> list[str]:
    """The methods a stream runs, in config order."""
    chosen = cfg["streams"][stream].get("methods")
    return [m for m in cfg["methods"] if chosen is None or m in chosen]


def substitute(value: Any, params: dict[str, Any], where: str) -> Any:
    """Replaces every string ``"@name"`` with the stream's ``params[name]``."""
    if isinstance(value, dict):
        return {k: substitute(v, params, where) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, params, where) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        key = value[1:]
        if key not in params:
            raise BenchConfigError(f"{where}: {value!r} refers to params.{key}, which the stream does not set "
                                   f"(its params: {sorted(params)})")
        return params[key]
    return value


def import_object(class_path: str) -> Any:
    """``package.module.Name`` -> the object, with a clear error."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise BenchConfigError(f"cannot import {class_path!r}: {err}") from err


def instantiate(spec: dict[str, Any], **extra: Any) -> Any:
    return import_object(spec["class_path"])(**{**(spec.get("init_args") or {}), **extra})


# ---------------------------------------------------------------------------- one run
def _proc_status(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def run_one(cfg: dict[str, Any], stream: str, method: str, seed: int, out_dir: Path,
            measure_memory: bool) -> dict[str, Any]:
    """Trains ``method`` on ``stream`` with ``seed``; returns metrics, matrix, wall time, peak
    memory added (MiB) and trainable parameters."""
    s = cfg["streams"][stream]
    spec = substitute(cfg["methods"][method] or {}, s.get("params", {}) or {}, f"stream {stream!r}, method {method!r}")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    pl.seed_everything(seed, verbose=False)
    dm = instantiate(s["datamodule"], seed=seed)
    _ = dm.benchmark  # load / decode the data before the clock and the memory counter start
    # a method's ``model`` entries (e.g. its own learning rate) override the stream's
    model = ContinualClassifier(**{**(s.get("model") or {}), **(spec.get("model") or {})})
    # and its ``trainer`` entries (e.g. SI's gradient clipping) the stream's Trainer arguments
    trainer_kw = {**(s.get("trainer") or {}), **(spec.get("trainer") or {})}
    cuda = trainer_kw.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available()
    device = s.get("device") or ("cuda" if cuda else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)

    rss0 = None
    if measure_memory and cuda:
        torch.cuda.reset_peak_memory_stats()
        rss0 = torch.cuda.memory_allocated() / 2**20
    elif measure_memory and _reset_peak_rss():
        rss0 = _proc_status("VmRSS")

    if "avalanche" in spec:
        check_peer(spec["avalanche"], dm)
        net = model.net
        optimizer = model.configure_optimizers()
        res = run_peer(spec["avalanche"], net, optimizer, dm, device=device, **(spec.get("args") or {}))
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        plot_matrix(res["matrix"], out_dir / "accuracy_matrix.png", title=f"{stream}: {method}, seed {seed}")
        (out_dir / "metrics.json").write_text(json.dumps({k: v for k, v in res.items()}, indent=1))
    else:
        callbacks = [instantiate(cb) for cb in spec.get("callbacks", []) or []]
        trainer_kw.setdefault("accelerator", "cpu")
        res = run_stream(model, dm, callbacks, output_dir=str(out_dir), **trainer_kw)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    peak = None
    if rss0 is not None:
        peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _proc_status("VmHWM")) - rss0
    return {**res, "peak_mem_mib": peak, "trainable_params": trainable,
            "stream": stream, "method": method, "seed": seed, "fingerprint": fingerprint(cfg, stream, method, seed)}


#: the code a run executes: every file of these packages and these benchmark modules
CODE_PACKAGES = ("cl_plugins", "callbacks", "datamodules")
CODE_FILES = ("examples/bench_runner.py", "examples/benchutils.py", "examples/peers.py")
_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the library's code (every ``.py`` file of :data:`CODE_PACKAGES` and :data:`CODE_FILES`) and of
    the versions of torch, lightning and avalanche: a result measured with other code is not reused."""
    h = hashlib.sha256()
    files = sorted(p for pkg in CODE_PACKAGES for p in (_ROOT / pkg).rglob("*.py")) + [_ROOT / f for f in CODE_FILES]
    for path in files:
        h.update(str(path.relative_to(_ROOT)).encode())
        h.update(path.read_bytes())
    from importlib.metadata import PackageNotFoundError, version

    try:
        avalanche = version("avalanche-lib")
    except PackageNotFoundError:  # not installed: part of what the fingerprint records
        avalanche = "none"
    h.update(f"torch {torch.__version__} lightning {pl.__version__} avalanche {avalanche}".encode())
    return h.hexdigest()[:16]


def code_revision() -> str:
    """Revision of the code the runner measures (``<commit>`` or ``<commit>+changes``), for the table's header."""
    return _code_revision((*CODE_PACKAGES, *CODE_FILES), _ROOT)


def fingerprint(cfg: dict[str, Any], stream: str, method: str, seed: int) -> str:
    """A hash of everything that defines one run (the stream's data, model and trainer settings, the method's
    spec with the stream's parameters filled in, the seed, the threads, and the code: :func:`code_fingerprint`):
    ``--reuse`` takes an earlier result only when all of it is unchanged."""
    s = cfg["streams"][stream]
    spec = substitute(cfg["methods"][method] or {}, s.get("params", {}) or {}, f"stream {stream!r}, method {method!r}")
    what = {"stream": {k: v for k, v in s.items() if k not in ("params", "methods")}, "method": spec, "seed": seed,
            "threads": cfg.get("threads"), "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reusable(saved: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The results of an earlier run of this config (the records of its ``results.json``) whose run is
    unchanged."""
    out = {}
    for r in saved:
        key = (r.get("stream"), r.get("method"), r.get("seed"))
        if key[0] in cfg["streams"] and key[1] in cfg["methods"] and \
                r.get("fingerprint") == fingerprint(cfg, *key):
            out[key] = r
    return out


def _child(conn: Any, *args: Any) -> None:
    try:
        # the run's own output (Lightning's messages, the metrics table) goes to <run dir>/run.log,
        # at the file-descriptor level so loggers created before the fork follow it too
        run_dir = Path(args[4])
        run_dir.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        log = os.open(run_dir / "run.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        conn.send({"ok": run_one(*args)})
    except BaseException as err:  # reported in the parent with the child's traceback
        conn.send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def run_forked(*args: Any) -> dict[str, Any]:
    """``run_one`` in a forked child: its own peak memory, no state left behind."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_end, *args))
    proc.start()
    child_end.close()
    try:
        msg = parent_end.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the benchmark run {args[1]!r} / {args[2]!r} / seed {args[3]} died "
                           f"(exit code {proc.exitcode}) before reporting") from None
    proc.join()
    if "error" in msg:
        raise RuntimeError(f"run {args[1]!r} / {args[2]!r} / seed {args[3]} failed: {msg['error']}\n"
                           f"{msg['traceback']}")
    return msg["ok"]


# ---------------------------------------------------------------------------- the table
#: metrics a config's ``published`` entries may give, with their column titles
PUBLISHED_METRICS = {"avg_acc": "avg acc", "task_il_avg_acc": "task-IL acc"}


def published_value(cfg: dict[str, Any], stream: str, method: str,
                    metric: str) -> tuple[float, float | None] | None:
    """The published ``(mean, std)`` (in %) of ``metric`` for ``method`` on ``stream``, if the config gives one;
    ``std`` is ``None`` where the source gives the mean alone (a number or ``[mean]``)."""
    entry = ((cfg.get("published") or {}).get("results") or {}).get(stream, {}).get(method, {})
    value = entry.get(metric) if isinstance(entry, dict) else None
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value), None
    return float(value[0]), (float(value[1]) if len(value) > 1 else None)


def agreement(ours: list[float], published: tuple[float, float | None], k: float = 2.0) -> str:
    """Whether our mean lies within the published mean ± ``k`` published std (the rule stated under the table);
    ``std n/a`` and the difference alone where no std was published."""
    mean = statistics.mean(ours)
    diff = mean - published[0]
    if published[1] is None:
        return f"std n/a ({diff:+.1f})"
    ok = abs(diff) <= k * published[1]
    return f"{'yes' if ok else 'no'} ({diff:+.1f})"


def _published_cell(published: tuple[float, float | None]) -> str:
    return f"{published[0]:.2f}" if published[1] is None else f"{published[0]:.2f} ± {published[1]:.2f}"


def table(results: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    """One markdown table: per stream and method, mean ± std over seeds, with the published figures beside ours
    where the config gives them (``published``)."""
    metrics = [m for m in PUBLISHED_METRICS if m == "avg_acc" or any(r.get(m) is not None for r in results)]
    with_published = {m for m in metrics for st in cfg["streams"] for me in cfg["methods"]
                      if published_value(cfg, st, me, m) is not None}
    header = ["stream", "method"]
    for m in metrics:
        header.append(f"{PUBLISHED_METRICS[m]} (%)")
        if m in with_published:
            header += [f"published {PUBLISHED_METRICS[m]} (%)", "within 2 std (diff)"]
    header += ["forgetting (%)", "BWT (%)", "wall (s)", f"time vs {REFERENCE}", "peak mem (MiB)", "trainable params"]
    rows = []
    for stream in cfg["streams"]:
        runs = [r for r in results if r["stream"] == stream]
        ref = [r["wall_s"] for r in runs if r["method"] == REFERENCE]
        for method in stream_methods(cfg, stream):
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            wall = statistics.mean(r["wall_s"] for r in mine)
            mem = [r["peak_mem_mib"] for r in mine]
            row = [stream, method]
            for m in metrics:
                values = [r.get(m) for r in mine]
                row.append(mean_std(values, 100))
                if m in with_published:
                    pub = published_value(cfg, stream, method, m)
                    ours = [100 * v for v in values if v is not None]
                    row += ["-", "-"] if pub is None or not ours else \
                        [_published_cell(pub), agreement(ours, pub)]
            row += [
                mean_std([r["avg_forgetting"] for r in mine], 100),
                mean_std([r["bwt"] for r in mine], 100),
                f"{wall:.1f}",
                f"{wall / statistics.mean(ref):.2f}x" if ref else "-",
                "-" if None in mem else f"{statistics.mean(mem):.0f}",
                f"{mine[0]['trainable_params']:,}",
            ]
            rows.append(row)
    return markdown_table(header, rows)


def replace_block(path: Path, name: str, body: str, title: str) -> None:
    """Puts ``body`` between the runner's markers for ``name`` in ``path`` (appended when absent)."""
    begin, end = f"<!-- bench_runner:{name}:begin -->", f"<!-- bench_runner:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + f"## {title}\n\n{block}\n"
    path.write_text(text)


def machine_line(cfg: dict[str, Any]) -> str:
    threads = cfg.get("threads") or torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads, "
            f"{gpu}; torch {torch.__version__}, lightning {pl.__version__}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's seeds")
    parser.add_argument("--streams", nargs="+", default=None, help="run only these streams")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods")
    parser.add_argument("--output-dir", default=None, help="default: the config's output_dir, else runs/bench")
    parser.add_argument("--markdown", default=None, help="write the table into this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--in-process", action="store_true", help="no forked child per run (no memory column)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="take the runs whose stream, method, seed and settings are unchanged from the output "
                             "folder's results.json instead of running them again (e.g. after adding a method)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    name = Path(args.config).stem
    if args.seeds:
        cfg["seeds"] = args.seeds
    for flag, key in ((args.streams, "streams"), (args.methods, "methods")):
        if flag:
            missing = [x for x in flag if x not in cfg[key]]
            if missing:
                raise BenchConfigError(f"--{key} {missing}: the config defines {list(cfg[key])}")
            cfg[key] = {k: v for k, v in cfg[key].items() if k in flag}
    for s in cfg["streams"].values():
        if s.get("methods"):
            s["methods"] = [m for m in s["methods"] if m in cfg["methods"]]
    out_root = Path(args.output_dir or cfg.get("output_dir") or "runs/bench") / name
    plan = [(stream, method, seed) for stream in cfg["streams"] for seed in cfg.get("seeds", [0])
            for method in stream_methods(cfg, stream)]
    execute: Callable[..., dict[str, Any]] = run_one if args.in_process else run_forked
    fork_ok = "fork" in multiprocessing.get_all_start_methods()
    if not fork_ok and not args.in_process:
        print("no fork start method on this platform: running in-process, without the memory column")
        execute = run_one

    saved_path = out_root / "results.json"
    saved = json.loads(saved_path.read_text()) if args.reuse and saved_path.exists() else []
    earlier = reusable(saved, cfg)
    # with --reuse, earlier runs outside this plan stay in results.json for later reuse
    planned = set(plan)
    keep = [r for r in saved if (r.get("stream"), r.get("method"), r.get("seed")) not in planned]
    results: list[dict[str, Any]] = []
    reused = 0
    start = time.perf_counter()
    bar = tqdm(plan, unit="run", disable=args.no_progress, dynamic_ncols=True)
    for stream, method, seed in bar:
        bar.set_description(f"{stream} | {method} | seed {seed}")
        run_dir = out_root / _slug(stream) / _slug(method) / f"seed{seed}"
        if (stream, method, seed) in earlier:
            results.append(earlier[(stream, method, seed)])
            reused += 1
            continue
        res = execute(cfg, stream, method, seed, run_dir, execute is not run_one)
        results.append(res)
        # saved after every run: an interrupted table resumes with --reuse from the last finished run
        out_root.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(json.dumps(keep + results, indent=1))
        bar.set_postfix(acc=f"{res['avg_acc']:.3f}", wall=f"{res['wall_s']:.0f}s")
        tqdm.write(f"{stream:14s} {method:28s} seed {seed}: avg acc {res['avg_acc']:.4f}  "
                   f"forgetting {_fmt(res['avg_forgetting'])}  wall {res['wall_s']:.1f}s")
    bar.close()

    text = table(results, cfg)
    print(text)
    out_root.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(keep + results, indent=1))
    (out_root / "table.md").write_text(text + "\n")
    print(f"{len(results) - reused} runs in {time.perf_counter() - start:.0f} s ({reused} reused); "
          f"per-run heatmaps and metrics.json under {out_root}")
    if args.markdown:
        seeds = cfg.get("seeds", [0])
        # the command that regenerates the table from scratch (``--reuse`` only skips unchanged runs)
        given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--reuse"]
        command = "python examples/bench_runner.py " + " ".join(shlex.quote(a) for a in given)
        source = (cfg.get("published") or {}).get("source")
        published_note = (f" Published figures: {source}; 'within 2 std' says whether our mean lies within the "
                          "published mean ± 2 published standard deviations." if source else "")
        body = (f"`{command}`\n\n{len(seeds)} seed(s) {seeds}, {machine_line(cfg)}; code {code_revision()}; "
                f"{time.strftime('%Y-%m-%d')}.{published_note} "
                f"Mean ± std over seeds; wall time is the mean, relative to the stream's `{REFERENCE}` row; "
                "peak memory is what the run added on top of the loaded data and model (RSS on CPU, "
                "allocated memory on CUDA).\n\n" + text)
        replace_block(Path(args.markdown), name, body, f"Benchmark runner: {name}")
    return results


def _slug(text: str) -> str:
    """A run folder's name for a stream or method name: ``"DER++ 500"`` -> ``"DERpp_500"`` (a ``+`` must not
    vanish, or DER++ would write into DER's folder)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("+", "p")).strip("_")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    main()
