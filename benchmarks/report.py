"""What every benchmark ends with: the machine it ran on, this project's times beside its
baseline's, and the one JSON object written to benchmarks/results/<name>.json and printed as
the last line."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """CPU model, cores, load average and the versions of the frameworks this process imported."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version()}
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        info.update(jax=jax.__version__, jax_backend=jax.default_backend(), jax_devices=jax.device_count())
    for name in ("torch", "transformers"):
        if name in sys.modules:
            info[name] = sys.modules[name].__version__
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def side_by_side(units: float, unit: str, first: dict, times: dict) -> dict:
    """Throughput, medians, every timed run and the first call of "jax" and "torch" (from
    timing.timed_interleaved), and the speedup = torch median / jax median."""
    jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
    return {f"jax_{unit}_per_s": round(units / jax_s, 1), f"torch_{unit}_per_s": round(units / torch_s, 1),
            "speedup_vs_torch": round(torch_s / jax_s, 3),
            "jax_median_s": round(jax_s, 5), "torch_median_s": round(torch_s, 5),
            "jax_times_s": [round(t, 5) for t in times["jax"]], "torch_times_s": [round(t, 5) for t in times["torch"]],
            "jax_first_call_s": round(first["jax"], 3), "torch_first_call_s": round(first["torch"], 3)}


def write_report(report: dict, path) -> dict:
    """Writes the report (indented) to `path` and prints it as one JSON line, last."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report, ensure_ascii=False))
    return report
