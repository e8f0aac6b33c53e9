"""What the benchmarks share: timing round-robin in one process, peak memory in a fresh process per row, a
one-process group for DeepSpeed-MoE, and the header line that records the machine's load.

Times are the median of passes taken round-robin (so a change in machine load hits every variant alike),
after one warm-up pass each. On CPU, `cpu_time=True` measures the process's CPU seconds
(`time.process_time`) instead of wall time: with one thread that is the work itself, much less sensitive to
other processes sharing the cores. On CUDA, wall time after a synchronize.
"""

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_device_arguments(parser) -> None:
    """`--device` and the clock: `--cpu-time` (one torch thread, CPU seconds; the default on CPU) or `--wall-time`."""
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--cpu-time", dest="cpu_time", action="store_true", default=None,
                        help="one torch thread, CPU seconds (default on CPU)")
    parser.add_argument("--wall-time", dest="cpu_time", action="store_false", help="all threads, wall seconds")


def resolve_device_arguments(args) -> None:
    """Fills in the defaults of `add_device_arguments` and pins torch to one thread for `--cpu-time`."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cpu_time is None:
        args.cpu_time = args.device == "cpu"
    if args.cpu_time:
        torch.set_num_threads(1)


def device_argv(args) -> List[str]:
    """The device arguments again, for a worker process."""
    return ["--device", args.device, "--cpu-time" if args.cpu_time else "--wall-time"]


def clock_name(args) -> str:
    return "CPU seconds of one thread" if args.cpu_time else "wall time"


def machine_line(device: str) -> str:
    import torch

    load = os.getloadavg()[0]
    what = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores, load average {load:.1f}"
    return f"{device}: {what}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(step: Callable[[], None], device: str, cpu_time: bool) -> float:
    """Seconds of one call of `step`: CPU seconds of this process when `cpu_time`, else wall seconds."""
    clock = time.process_time if cpu_time and device == "cpu" else time.perf_counter
    _synchronize(device)
    start = clock()
    step()
    _synchronize(device)
    return clock() - start


def round_robin(steps: Dict[str, Callable[[], None]], repeats: int, device: str, cpu_time: bool) -> Dict[str, float]:
    """Median seconds of each step over `repeats` round-robin passes, after one warm-up pass of each."""
    for step in steps.values():
        step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(measure(step, device, cpu_time))
    return {name: statistics.median(values) for name, values in times.items()}


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mib(step: Callable[[], None], device: str) -> float:
    """Memory one call of `step` needs above what is already allocated: peak CUDA allocation, or on CPU the
    growth of the process's max RSS (a lower bound if setup peaked higher; run it in a fresh process)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _max_rss_mib()
    step()
    return _max_rss_mib() - base


MEMORY_NOTE = {
    "cuda": "peak CUDA memory allocated by one pass, above what the model and inputs already held",
    "cpu": "growth of the process's max RSS over one pass, from its value after setup, one fresh process per "
           "row (a lower bound if setup peaked higher)",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process_group(device: str) -> None:
    """The deepspeed MoE backend needs a process group: a one-process one (nccl on CUDA, else gloo)."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)


def run_worker(script: str, argv: Sequence[str]):
    """Runs `python script *argv` from the repository root and returns the JSON its last line prints."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, os.path.abspath(script), *argv], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
