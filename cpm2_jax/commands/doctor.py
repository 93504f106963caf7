"""`cpm2 doctor`: what this machine offers the project and what the big models would need on it.

Reports, without allocating anything large: the JAX backend, its devices and their memory
kinds, the installed versions, whether the data and vocabulary paths the settings and gin
files name exist, where gin files are looked up, and what `cpm2_11b` and `cpm2_moe_198b`
need per device when sharded over every visible device (`footprint`, the code behind
`cpm2 params`) and with the MoE experts offloaded to host memory (`offload.plan`, the code
behind `cpm2 offload --plan`). `--json` prints one JSON object; otherwise a table.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import re
import sys

# The packages whose versions decide whether a run behaves as in the tests.
PACKAGES = ("cpm2-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "seqio", "tensorflow",
            "gin-config", "sentencepiece", "numpy", "torch", "transformers")
# The models whose needs are reported: (name, gin file under gin/models).
MODELS = (("cpm2_11b", "models/cpm2_11b.gin"), ("cpm2_moe_198b", "models/cpm2_moe_198b.gin"))
# A gin binding or macro whose name says it holds a path (checked when its value is a string).
_PATH_KEY = re.compile(r"(dir|path|vocab|file)", re.I)
_STRING_BINDING = re.compile(r"^\s*([\w.]+)\s*=\s*['\"]([^'\"]+)['\"]\s*$", re.M)


def register(subparsers) -> None:
    from cpm2_jax.gin_utils import add_gin_flags

    p = subparsers.add_parser("doctor", help="backend, devices, versions, paths, and what the 11B/198B models need",
                              description=__doc__.splitlines()[0])
    add_gin_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no_models", action="store_true", help="skip the 11B/198B memory estimates (a few seconds)")
    p.set_defaults(func=run)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def backend_report() -> dict:
    """The default backend, and each device with its memory kinds and memory limit."""
    import jax

    from cpm2_jax.offload.plan import device_memory

    devices = []
    for d in jax.devices():
        try:
            kinds = sorted({m.kind for m in d.addressable_memories()})
            default_kind = d.default_memory().kind
        except Exception:  # noqa: BLE001 - some plugins expose no memory spaces
            kinds, default_kind = [], None
        devices.append({"id": d.id, "platform": d.platform, "kind": d.device_kind, "process": d.process_index,
                        "memory_kinds": kinds, "default_memory_kind": default_kind,
                        "memory_bytes": device_memory(d)})
    return {"backend": jax.default_backend(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
            "devices": devices}


TINY_ENV = "CPM2_TINY"  # set (to 1) by the notebook test: the smallest sizes and a few steps
# The named size a notebook or quick run trains on each backend: (dense, MoE). A CPU trains the
# tiny layout in seconds; one accelerator holds `small` (and its 8-expert MoE) with room to spare.
SIZE_FOR_BACKEND = {"cpu": ("tiny", "cpm2_moe_tiny"), "gpu": ("small", "cpm2_moe_small"),
                    "tpu": ("small", "cpm2_moe_small")}


def tiny_mode() -> bool:
    """True when $CPM2_TINY is set to anything but 0/false/empty (the test suite's notebook runs)."""
    return os.environ.get(TINY_ENV, "").strip().lower() not in ("", "0", "false", "no")


def suggested_size(kind: str = "dense") -> str:
    """A named size (`cpm2_jax.config.SIZES`) that fits and trains quickly on this backend:
    `tiny`/`cpm2_moe_tiny` on a CPU or in tiny mode, `small`/`cpm2_moe_small` on a GPU or TPU."""
    import jax

    if kind not in ("dense", "moe"):
        raise ValueError(f"kind must be 'dense' or 'moe', got {kind!r}")
    backend = "cpu" if tiny_mode() else jax.default_backend()
    dense, moe = SIZE_FOR_BACKEND.get(backend, SIZE_FOR_BACKEND["cpu"])
    return dense if kind == "dense" else moe


def _path_entry(source: str, name: str, value: str | os.PathLike | None) -> dict:
    if value is None:
        return {"source": source, "name": name, "path": None, "exists": False}
    path = pathlib.Path(value).expanduser()
    return {"source": source, "name": name, "path": str(path), "exists": path.exists()}


def gin_path_bindings(files) -> list[dict]:
    """String bindings and macros whose name says path/dir/vocab/file, in the given gin files."""
    found = []
    for file in files:
        try:
            text = pathlib.Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            found.append({"source": str(file), "name": "(unreadable)", "path": None, "exists": False,
                          "error": str(err)})
            continue
        for name, value in _STRING_BINDING.findall(text):
            if _PATH_KEY.search(name.rsplit(".", 1)[-1]) and value not in ("-", ""):  # "-" = stdin/stdout
                found.append(_path_entry(str(file), name, value))
    return found


def paths_report(gin_files=(), gin_search_paths: str = "") -> dict:
    """The data directory, vocabulary and cache the settings resolve to (no vocabulary is trained
    here), the per-dataset directories, gin search paths and the gin files they hold."""
    from cpm2_jax.errors import ConfigError
    from cpm2_jax.gin_utils import GIN_DIR, _resolve, search_paths
    from cpm2_jax.tasks import settings

    entries = []
    try:
        data = settings.data_dir()
        source = "set_data_dir" if settings._overrides["data_dir"] else (  # pylint: disable=protected-access
            f"${settings.DATA_DIR_ENV}" if os.environ.get(settings.DATA_DIR_ENV) else "default (../shared/data)")
        entries.append(_path_entry(source, "data_dir", data))
    except ConfigError as err:
        entries.append({"source": "settings", "name": "data_dir", "path": None, "exists": False, "error": str(err)})
    for key, value in sorted(os.environ.items()):
        if key.startswith(settings.DATA_DIR_ENV + "_"):
            entries.append(_path_entry(f"${key}", key[len(settings.DATA_DIR_ENV) + 1:].lower(), value))
    vocab = settings._overrides["vocabulary"] or os.environ.get(settings.VOCAB_ENV)  # pylint: disable=protected-access
    if vocab:
        entries.append(_path_entry(f"${settings.VOCAB_ENV}", "vocabulary", vocab))
    else:
        cached = sorted((settings.cache_dir() / "vocab").glob("auto_*.model"))
        entries.append({"source": "automatic (trained at first use)", "name": "vocabulary",
                        "path": str(cached[-1]) if cached else str(settings.cache_dir() / "vocab"),
                        "exists": bool(cached)})
    entries.append(_path_entry(f"${settings.CACHE_ENV} / XDG cache", "cache_dir", settings.cache_dir()))

    paths = search_paths(gin_search_paths)
    resolved = []
    for name in gin_files:
        try:
            resolved.append(_resolve(name, paths))
        except ConfigError as err:
            entries.append({"source": "--gin_file", "name": name, "path": None, "exists": False, "error": str(err)})
    shipped = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.glob("*/*.gin"))
    entries += gin_path_bindings(resolved + [str(GIN_DIR / f) for f in shipped])
    return {"paths": entries,
            "gin": {"gin_dir": str(GIN_DIR), "search_paths": [str(p) for p in paths],
                    "files": shipped, "parsed": resolved}}


def _mesh_for(config, devices: int) -> dict:
    """Every visible device in one mesh: experts over `expert` (as many as divide both), the
    rest over `model` (tensor parallelism, as the 11B release ran)."""
    expert = math.gcd(devices, config.num_experts) if config.is_moe else 1
    mesh = {"data": 1, "model": devices // expert}
    if expert > 1:
        mesh["expert"] = expert
    return mesh


def model_needs(config, devices: int, device_bytes: int, bandwidth: float | None) -> dict:
    """Per-device bytes of `config` sharded over `devices` (training: float32 params + AdamW
    state; inference: bfloat16 params), and for an MoE config the offloaded plan on one device."""
    from cpm2_jax.errors import CPM2Error
    from cpm2_jax.footprint import footprint
    from cpm2_jax.offload.plan import make_plan

    mesh = _mesh_for(config, devices)
    out: dict = {"mesh": mesh, "device_bytes": device_bytes}
    try:
        report = footprint(config.replace(param_dtype="float32"), mesh, "adamw")
    except CPM2Error as err:
        out["sharded"] = {"error": str(err)}
    else:
        per = report["per_device_bytes"]
        infer = per["params"] // 2  # every parameter in bfloat16
        out["parameters"] = report["total"]
        out["sharded"] = {"train_bytes": per["total"], "train_fits": per["total"] <= device_bytes,
                          "infer_bf16_bytes": infer, "infer_fits": infer <= device_bytes}
    if config.is_moe:
        plan = make_plan(config.replace(param_dtype="bfloat16"), device_bytes=device_bytes,
                         bandwidth=bandwidth or 1.0)
        out["offloaded"] = {"resident_bytes": plan.resident_bytes, "expert_bytes": plan.expert_bytes,
                            "largest_k": plan.largest_k, "fits": plan.largest_k >= 1,
                            "bytes_per_step": plan.bytes_per_step,
                            "tokens_per_s": round(plan.tokens_per_s, 3) if bandwidth else None}
    else:
        out["offloaded"] = None  # dense: no experts to move to host memory
    return out


def models_report(backend: dict, measure: bool = True) -> dict:
    """What each of MODELS needs on the devices this process sees."""
    import gin

    from cpm2_jax.gin_utils import model_config, parse_gin
    from cpm2_jax.offload.plan import measure_bandwidth

    import jax

    device_bytes = min(d["memory_bytes"] for d in backend["devices"])
    bandwidth = measure_bandwidth(jax.devices()[0], nbytes=16 << 20, reps=2) if measure else None
    out = {"host_to_device_bytes_per_s": round(bandwidth) if bandwidth else None}
    for name, gin_file in MODELS:
        parse_gin([gin_file])
        try:
            config = model_config().replace(scan_layers=True)  # same parameters, faster to trace
        finally:
            gin.clear_config()
        out[name] = model_needs(config, backend["device_count"], device_bytes, bandwidth)
    return out


def doctor(gin_files=(), gin_search_paths: str = "", models: bool = True) -> dict:
    """The whole report as one JSON-serialisable dict."""
    backend = backend_report()
    report = {"python": platform.python_version(), "platform": platform.platform(),
              "executable": sys.executable,
              "versions": {name: _version(name) for name in PACKAGES},
              "jax_platforms": os.environ.get("JAX_PLATFORMS"), **backend}
    report.update(paths_report(gin_files, gin_search_paths))
    if models:
        report["models"] = models_report(backend)
    return report


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:,.2f} GiB"


def format_table(report: dict) -> str:
    """The report as aligned text sections."""
    lines = [f"python       {report['python']} ({report['executable']})", f"platform     {report['platform']}",
             f"backend      {report['backend']}: {report['device_count']} device(s), "
             f"{report['process_count']} process(es)", "", "devices"]
    for d in report["devices"]:
        lines.append(f"  {d['id']:>3} {d['platform']:<5} {d['kind']:<24} memory {_gib(d['memory_bytes']):>12}  "
                     f"kinds {', '.join(d['memory_kinds']) or '-'} (default {d['default_memory_kind']})")
    lines += ["", "versions"] + [f"  {k:<18} {v or 'not installed'}" for k, v in report["versions"].items()]
    lines += ["", "paths"]
    for p in report["paths"]:
        state = "ok     " if p["exists"] else "MISSING"
        lines.append(f"  {state} {p['name']:<28} {p['path'] or p.get('error', '')}  [{p['source']}]")
    gin = report["gin"]
    lines += ["", f"gin files    {gin['gin_dir']} ({len(gin['files'])} files)",
              f"  search     {', '.join(gin['search_paths'])}"]
    if report.get("models"):
        models = report["models"]
        bw = models["host_to_device_bytes_per_s"]
        lines += ["", f"models on these devices (host->device {bw / 1e9:.2f} GB/s)" if bw else "models"]
        for name, _ in MODELS:
            m = models[name]
            s = m["sharded"]
            mesh = ",".join(f"{k}={v}" for k, v in m["mesh"].items())
            if "error" in s:
                lines.append(f"  {name:<14} mesh {mesh}: {s['error']}")
            else:
                lines.append(f"  {name:<14} {m['parameters']:,} parameters; mesh {mesh}, per device: train "
                             f"{_gib(s['train_bytes'])} ({'fits' if s['train_fits'] else 'does not fit'}), infer bf16 "
                             f"{_gib(s['infer_bf16_bytes'])} ({'fits' if s['infer_fits'] else 'does not fit'}) "
                             f"of {_gib(m['device_bytes'])}")
            o = m["offloaded"]
            if o:
                speed = f", <= {o['tokens_per_s']} tokens/s batch 1" if o["tokens_per_s"] else ""
                lines.append(f"  {'':<14} offloaded experts on one device: resident {_gib(o['resident_bytes'])}, "
                             f"{_gib(o['expert_bytes'])} per expert, largest K {o['largest_k']}, "
                             f"{_gib(o['bytes_per_step'])} moved per step{speed}")
    return "\n".join(lines)


def run(args) -> int:
    report = doctor(args.gin_file, args.gin_search_paths, models=not args.no_models)
    print(json.dumps(report) if args.json else format_table(report))
    return 0
