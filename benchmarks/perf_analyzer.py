"""Triton's own load generator, perf_analyzer (C++), against onnxserve: find it, fetch it,
run it, read its CSV report.

perf_analyzer measures a server without the Python client's CPU in the way: it is the
figure Triton users quote. It ships inside the ``tritonclient`` 2.41.0 wheel
(``bin/perf_analyzer``, Linux x86_64) and needs two shared libraries besides the system's:

- ``libb64.so.0d``: Debian's package ``libb64-0d`` (``apt-get install libb64-0d``);
- ``libcudart.so.12``, even on a machine without a GPU: the ``nvidia-cuda-runtime-cu12``
  wheel's ``nvidia/cuda_runtime/lib/libcudart.so.12``, found through LD_LIBRARY_PATH.

find_perf_analyzer() looks for the binary given explicitly, then in ``$ONNXSERVE_PERF_ANALYZER``,
then in the cache folder (``$XDG_CACHE_HOME/onnxserve/perf_analyzer``, by default
``~/.cache/onnxserve/perf_analyzer``), and otherwise downloads both wheels there with
``pip download`` and unpacks the two files. Libraries are looked for next to the binary and in
the cache folder.

run_perf_analyzer() runs one load (closed loop at a concurrency, or Poisson arrivals at a
rate) and returns its throughput and latency percentiles from the ``-f`` CSV report, over a
``Transport``: gRPC or HTTP (``-i``), each request sent plainly (one call, one answer),
streamed (gRPC's ModelStreamInfer: ``--streaming``, in perf_analyzer's async mode), or with
its tensors in system shared memory (``--shared-memory system``: perf_analyzer creates and
registers a region per input and output, and requests name them). perf_analyzer uses these
calls of the KServe V2 protocol: server metadata, model metadata and config once at start
(and the shared memory registrations), model statistics before and after each measurement
window, and inference for the load.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .load import LoadResult

#: The wheel that ships perf_analyzer (as tritonclient-2.41.0.data/data/bin/perf_analyzer).
TRITONCLIENT_REQUIREMENT = "tritonclient==2.41.0"
#: The wheel that ships the CUDA 12 runtime perf_analyzer links against.
CUDART_REQUIREMENT = "nvidia-cuda-runtime-cu12==12.3.101"
#: Where in the tritonclient wheel the binary is (the folder before it is versioned).
BINARY_MEMBER = re.compile(r"^tritonclient-[^/]+\.data/data/bin/perf_analyzer$")
#: Where in the nvidia-cuda-runtime-cu12 wheel the library is.
CUDART_MEMBER = "nvidia/cuda_runtime/lib/libcudart.so.12"
CUDART = "libcudart.so.12"
LIBB64 = "libb64.so.0d"
#: The variable naming the perf_analyzer binary to use.
ENV_VAR = "ONNXSERVE_PERF_ANALYZER"
#: perf_analyzer judges a measurement stable when the last three windows agree within this
#: many percent on throughput and on latency (its default, and the Python client's).
STABILITY_PERCENT = 10.0
#: Windows perf_analyzer needs at least: it compares the last three.
MIN_WINDOWS = 3
#: --stability-percentage for the second try after an unstable first one: any three
#: windows pass, and the result is marked unstable.
ANY_WINDOWS_PERCENT = 1000.0
#: perf_analyzer's protocols (-i).
PROTOCOLS = ("grpc", "http")
#: How each request travels: "plain" (one call, one answer), "streaming" (gRPC's
#: ModelStreamInfer, --streaming), "shared-memory" (tensors in system shared memory regions
#: perf_analyzer registers, --shared-memory system).
MODES = ("plain", "streaming", "shared-memory")


@dataclass(frozen=True)
class Transport:
    """How perf_analyzer reaches the server: ``protocol`` (PROTOCOLS) and ``mode`` (MODES).

    Raises:
        ValueError: an unknown protocol or mode, or streaming over HTTP (perf_analyzer
            streams over gRPC only).
    """

    protocol: str = "grpc"
    mode: str = "plain"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"perf_analyzer protocol {self.protocol!r} is not one of "
                             f"{', '.join(PROTOCOLS)}")
        if self.mode not in MODES:
            raise ValueError(f"perf_analyzer mode {self.mode!r} is not one of "
                             f"{', '.join(MODES)}")
        if self.mode == "streaming" and self.protocol != "grpc":
            raise ValueError("perf_analyzer streams over gRPC only (--streaming needs -i "
                             f"grpc), not {self.protocol}")

    @property
    def label(self) -> str:
        """``grpc``, ``http``, ``grpc streaming``, ``http shared-memory``, ..."""
        return self.protocol if self.mode == "plain" else f"{self.protocol} {self.mode}"

    def flags(self, output_shared_memory_size: int | None = None) -> list[str]:
        """perf_analyzer's flags for this transport (after ``-i PROTOCOL``):
        ``--streaming --async`` (perf_analyzer streams in async mode), or ``--shared-memory
        system`` with ``--output-shared-memory-size`` when given (bytes per output and
        sample; needed for BYTES or variable-shape outputs larger than its 100 KB default)."""
        if self.mode == "streaming":
            return ["--streaming", "--async"]
        if self.mode == "shared-memory":
            size = ([] if output_shared_memory_size is None
                    else ["--output-shared-memory-size", str(output_shared_memory_size)])
            return ["--shared-memory", "system", *size]
        return []


def _manual_steps(cache: Path) -> str:
    return (f"to install it by hand: pip download {TRITONCLIENT_REQUIREMENT} "
            f"{CUDART_REQUIREMENT} --no-deps -d DIR, unzip bin/perf_analyzer from the first "
            f"and {CUDART_MEMBER} from the second into {cache} (or any folder, then pass its "
            f"perf_analyzer with --perf-analyzer or {ENV_VAR}), and apt-get install libb64-0d")


#: What to do about each library perf_analyzer may lack.
LIBRARY_HINTS = {
    LIBB64: "apt-get install libb64-0d (Debian/Ubuntu package)",
    CUDART: (f"the CUDA 12 runtime, needed even without a GPU: pip download {CUDART_REQUIREMENT}"
             f" --no-deps, then unzip {CUDART_MEMBER} next to perf_analyzer or into the cache "
             "folder (onnxserve bench does this when it fetches perf_analyzer)"),
}


class PerfAnalyzerMissing(RuntimeError):
    """perf_analyzer, or a shared library it needs, is not here; the message names what is
    missing and how to get it."""


class PerfAnalyzerFailed(RuntimeError):
    """perf_analyzer ran and exited with an error; the message quotes its error lines.

    Attributes: ``returncode``, ``output`` (its whole stdout and stderr), ``command``.
    """

    def __init__(self, message: str, returncode: int, output: str,
                 command: Sequence[str]) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output
        self.command = list(command)


def default_cache() -> Path:
    """The folder perf_analyzer is fetched into: ``$XDG_CACHE_HOME/onnxserve/perf_analyzer``,
    or ``~/.cache/onnxserve/perf_analyzer`` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxserve" / "perf_analyzer"


@dataclass(frozen=True)
class PerfAnalyzer:
    """A perf_analyzer binary and the folders its libraries are loaded from."""

    binary: Path
    library_path: tuple[Path, ...] = ()

    def environment(self) -> dict[str, str]:
        """This process's environment with ``library_path`` before LD_LIBRARY_PATH."""
        env = dict(os.environ)
        parts = [str(p) for p in self.library_path]
        if env.get("LD_LIBRARY_PATH"):
            parts.append(env["LD_LIBRARY_PATH"])
        if parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
        return env

    def version(self) -> str:
        """What ``perf_analyzer --version`` says, e.g. ``Perf Analyzer Version 2.41.0 (commit
        fbb030e)``.

        Raises:
            PerfAnalyzerFailed: it exited with an error.
        """
        command = [str(self.binary), "--version"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env=self.environment())
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            raise PerfAnalyzerFailed(f"{self.binary} --version failed (exit "
                                     f"{result.returncode}): {output[-500:]}",
                                     result.returncode, output, command)
        return output


def parse_ldd(text: str) -> list[str]:
    """The libraries ``ldd`` reports as ``=> not found``, in its order."""
    return [line.split("=>", 1)[0].strip() for line in text.splitlines()
            if "=>" in line and line.split("=>", 1)[1].strip() == "not found"]


def missing_libraries(analyzer: PerfAnalyzer) -> list[str]:
    """Shared libraries ``analyzer.binary`` needs and the loader cannot find (with its
    library_path), from ``ldd``; an empty list when none, or when ``ldd`` is not installed
    (then a run says what is missing)."""
    try:
        result = subprocess.run(["ldd", str(analyzer.binary)], capture_output=True, text=True,
                                timeout=60, env=analyzer.environment())
    except FileNotFoundError:
        return []
    return parse_ldd(result.stdout)


def describe_missing(libraries: Sequence[str], binary: Path) -> str:
    """The message for ``libraries`` that ``binary`` lacks: each with how to get it."""
    hints = "; ".join(f"{lib}: {LIBRARY_HINTS.get(lib, 'install the package that provides it')}"
                      for lib in libraries)
    return f"perf_analyzer ({binary}) cannot start, missing shared libraries: {hints}"


def _loader_error(output: str) -> list[str]:
    """Libraries named by the dynamic loader's ``error while loading shared libraries``."""
    return re.findall(r"error while loading shared libraries: ([^:\s]+):", output)


def _run_pip(requirement: str, folder: Path, python: str) -> Path:
    command = [python, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise PerfAnalyzerMissing(f"cannot fetch perf_analyzer: {python} does not exist "
                                  "(expected a Python with pip)") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise PerfAnalyzerMissing(
            f"cannot fetch perf_analyzer: `pip download {requirement}` failed (exit "
            f"{result.returncode}): {tail}")
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(folder.glob(f"{name}-*.whl"))
    if not wheels:
        raise PerfAnalyzerMissing(f"cannot fetch perf_analyzer: pip download {requirement} "
                                  f"left no {name}-*.whl in {folder} (expected a wheel)")
    return wheels[-1]


def _extract(wheel: Path, member: Callable[[str], bool], what: str, target: Path) -> None:
    """Copy the one file of ``wheel`` whose name ``member`` accepts to ``target`` (executable),
    replacing it atomically."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if member(n)]
        if len(names) != 1:
            raise PerfAnalyzerMissing(f"{wheel.name} holds no {what} (found {len(names)} "
                                      "matching files; expected one)")
        staged = target.with_name(f".{target.name}.{os.getpid()}.part")
        with archive.open(names[0]) as src, staged.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    staged.chmod(staged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(staged, target)


def fetch_cudart(cache: Path, *, python: str = sys.executable,
                 log: Callable[[str], None] | None = None) -> Path:
    """Download the nvidia-cuda-runtime-cu12 wheel with pip and put its libcudart.so.12 in
    ``cache``; returns the library's path.

    Raises:
        PerfAnalyzerMissing: pip failed (its message quoted) or the wheel lacks the library.
    """
    cache.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"fetching {CUDART} ({CUDART_REQUIREMENT}) into {cache}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _run_pip(CUDART_REQUIREMENT, Path(tmp), python)
        _extract(wheel, lambda n: n == CUDART_MEMBER, CUDART_MEMBER, cache / CUDART)
    return cache / CUDART


def fetch_perf_analyzer(cache: Path, *, python: str = sys.executable,
                        log: Callable[[str], None] | None = None) -> Path:
    """Download the tritonclient 2.41.0 and nvidia-cuda-runtime-cu12 wheels with ``python -m
    pip download`` (no dependencies) and unpack perf_analyzer and libcudart.so.12 into
    ``cache``; returns the binary's path. The library is put in place first and the binary
    last, each by an atomic rename, so a binary in ``cache`` has its library beside it.

    Raises:
        PerfAnalyzerMissing: pip failed (its message quoted, with the steps to do it by
            hand) or a wheel lacks the file expected in it.
    """
    cache.mkdir(parents=True, exist_ok=True)
    try:
        if not (cache / CUDART).is_file():
            fetch_cudart(cache, python=python, log=log)
        if log:
            log(f"fetching perf_analyzer ({TRITONCLIENT_REQUIREMENT} wheel) into {cache}")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            wheel = _run_pip(TRITONCLIENT_REQUIREMENT, Path(tmp), python)
            _extract(wheel, lambda n: bool(BINARY_MEMBER.match(n)), "bin/perf_analyzer",
                     cache / "perf_analyzer")
    except PerfAnalyzerMissing as exc:
        raise PerfAnalyzerMissing(f"{exc}; {_manual_steps(cache)}") from None
    return cache / "perf_analyzer"


def find_perf_analyzer(path: Path | None = None, *, cache: Path | None = None,
                       fetch: bool = True, python: str = sys.executable,
                       log: Callable[[str], None] | None = None) -> PerfAnalyzer:
    """The perf_analyzer to run: ``path`` when given, else ``$ONNXSERVE_PERF_ANALYZER``, else
    ``cache``/perf_analyzer (default_cache()), else, with ``fetch``, downloaded into ``cache``
    (fetch_perf_analyzer). Its libraries are looked for next to it and in ``cache``; a
    missing libcudart.so.12 is fetched into ``cache`` too when ``fetch``.

    Raises:
        PerfAnalyzerMissing: the binary given is not an executable file, none is found and
            ``fetch`` is false, fetching failed, or a library is missing (libb64.so.0d:
            ``apt-get install libb64-0d``); the message says which and how to get it.
    """
    cache = cache or default_cache()
    if path is not None:
        binary, source = Path(path), "perf_analyzer path"
    elif os.environ.get(ENV_VAR):
        binary, source = Path(os.environ[ENV_VAR]), ENV_VAR
    elif (cache / "perf_analyzer").is_file():
        binary, source = cache / "perf_analyzer", "cached perf_analyzer"
    elif fetch:
        binary, source = fetch_perf_analyzer(cache, python=python, log=log), "fetched"
    else:
        raise PerfAnalyzerMissing(
            f"perf_analyzer not found: no path given, {ENV_VAR} unset and nothing in {cache}; "
            f"pass its path, set {ENV_VAR}, or let it be fetched there; {_manual_steps(cache)}")
    if not binary.is_file():
        raise PerfAnalyzerMissing(f"{source} {binary} is not a file (expected the perf_analyzer "
                                  f"binary, bin/perf_analyzer of the {TRITONCLIENT_REQUIREMENT} "
                                  "wheel)")
    if not os.access(binary, os.X_OK):
        raise PerfAnalyzerMissing(f"{source} {binary} is not executable (chmod +x it)")
    folders = dict.fromkeys(p for p in (binary.resolve().parent, cache) if p.is_dir())
    analyzer = PerfAnalyzer(binary, tuple(folders))
    missing = missing_libraries(analyzer)
    if CUDART in missing and fetch:
        fetch_cudart(cache, python=python, log=log)
        analyzer = PerfAnalyzer(binary, tuple(dict.fromkeys([*analyzer.library_path, cache])))
        missing = missing_libraries(analyzer)
    if missing:
        raise PerfAnalyzerMissing(describe_missing(missing, binary))
    return analyzer


@dataclass(frozen=True)
class CsvRow:
    """One row of perf_analyzer's ``-f`` CSV report: one load. Times in milliseconds (the CSV
    has microseconds), throughput in inferences/s (requests/s x batch size)."""

    concurrency: int | None
    rate: float | None
    throughput: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    client_send_ms: float
    client_recv_ms: float
    #: only in the --verbose-csv report
    avg_latency_ms: float | None
    #: the server's side (SERVER_COLUMNS), None where the report has none: perf_analyzer
    #: reports it only for a server whose ServerMetadata names the ``statistics`` extension
    network_server_ms: float | None = None
    server_queue_ms: float | None = None
    server_compute_input_ms: float | None = None
    server_compute_infer_ms: float | None = None
    server_compute_output_ms: float | None = None


#: CSV column -> CsvRow field, for the columns in microseconds every report has.
_MICROSECOND_COLUMNS = {
    "p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms",
    "p99 latency": "p99_ms", "Client Send": "client_send_ms", "Client Recv": "client_recv_ms",
}
#: CSV column -> CsvRow field, for the server's side (microseconds): all or none of them,
#: none when the server's ServerMetadata does not name the ``statistics`` extension.
SERVER_COLUMNS = {
    "Network+Server Send/Recv": "network_server_ms", "Server Queue": "server_queue_ms",
    "Server Compute Input": "server_compute_input_ms",
    "Server Compute Infer": "server_compute_infer_ms",
    "Server Compute Output": "server_compute_output_ms",
}


def parse_csv(text: str) -> list[CsvRow]:
    """The rows of a perf_analyzer CSV report (``-f FILE``, with or without
    ``--verbose-csv``); columns it does not know are ignored. The server's side
    (SERVER_COLUMNS) may be left out, all of it (perf_analyzer leaves it out for a server
    that does not declare the statistics extension): its fields are then None.

    Raises:
        ValueError: no header, a load column (``Concurrency`` or ``Request Rate``) or
            another needed column is missing (one of SERVER_COLUMNS while others are
            there), a cell is not a number, or there is no row; the message names the
            column and the row.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("perf_analyzer CSV is empty (expected a header line and a row per "
                         "load)")
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    load = next((c for c in ("Concurrency", "Request Rate") if c in columns), None)
    server = dict(SERVER_COLUMNS) if set(SERVER_COLUMNS) & set(columns) else {}
    needed = ["Inferences/Second", *_MICROSECOND_COLUMNS, *server]
    missing = [c for c in needed if c not in columns] + (
        [] if load else ["Concurrency or Request Rate"])
    if missing:
        raise ValueError(f"perf_analyzer CSV lacks column(s) {', '.join(missing)} (columns: "
                         f"{', '.join(columns)})")
    assert load is not None
    rows = []
    for number, record in enumerate(reader, start=2):
        def number_in(column: str, record: dict = record, line: int = number) -> float:
            cell = (record.get(column) or "").strip()
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"perf_analyzer CSV line {line}: {column} is {cell!r}, not a "
                                 "number") from None
            if not math.isfinite(value):
                raise ValueError(f"perf_analyzer CSV line {line}: {column} is {cell!r}, not a "
                                 "finite number")
            return value

        times = {field: number_in(column) / 1000
                 for column, field in {**_MICROSECOND_COLUMNS, **server}.items()}
        level = number_in(load)
        rows.append(CsvRow(
            concurrency=int(level) if load == "Concurrency" else None,
            rate=level if load == "Request Rate" else None,
            throughput=number_in("Inferences/Second"),
            avg_latency_ms=number_in("Avg latency") / 1000 if "Avg latency" in columns
            else None,
            **times,
        ))
    if not rows:
        raise ValueError("perf_analyzer CSV has a header but no row (expected one per load)")
    return rows


_PASS = re.compile(r"Pass \[(\d+)\] throughput: ([0-9.eE+-]+) infer/sec")
_REQUEST_COUNT = re.compile(r"^\s*Request count: (\d+)\s*$", re.M)


def parse_windows(output: str) -> list[float]:
    """Throughput (inferences/s) of each measurement window perf_analyzer printed with ``-v``
    (``Pass [n] throughput: X infer/sec``), in order; windows of a failed first try
    included."""
    return [float(m.group(2)) for m in _PASS.finditer(output)]


def parse_request_count(output: str) -> int | None:
    """Requests completed in the reported (last, stable) windows: the client's ``Request
    count`` of perf_analyzer's summary; None when it printed none."""
    counts = _REQUEST_COUNT.findall(output)
    return int(counts[-1]) if counts else None


def error_lines(output: str) -> str:
    """perf_analyzer's error lines (``error: ...``, ``Thread [n] had error``, ``Failed to
    ...``), or its last lines when none looks like one."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(?i)\berror\b|failed to|had error", line)]
    return " | ".join(errors or lines[-5:])


def input_data(inputs: Mapping[str, np.ndarray]) -> dict:
    """perf_analyzer's ``--input-data`` JSON for one request's worth of each input: the raw
    bytes in base64 and the shape (without the batch dimension for batching models: one
    sample, which perf_analyzer repeats -b times)."""
    step = {}
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        step[name] = {"b64": base64.b64encode(array.tobytes()).decode("ascii"),
                      "shape": list(array.shape)}
    return {"data": [step]}


def build_command(binary: Path | str, url: str, model: str, *, csv_path: Path,
                  concurrency: int = 1, rate: float | None = None, batch_size: int = 1,
                  input_data_path: Path | str | None = None,
                  shapes: Mapping[str, Sequence[int]] | None = None,
                  window_s: float = 3.0, max_windows: int = 6,
                  stability_percent: float = STABILITY_PERCENT,
                  transport: Transport = Transport(),
                  output_shared_memory_size: int | None = None,
                  extra: Sequence[str] = ()) -> list[str]:
    """perf_analyzer's argv for one load over ``transport`` (``url``: that protocol's
    host:port): closed loop at ``concurrency``, or Poisson arrivals at ``rate`` requests/s
    when given; ``window_s`` seconds per window (``-p`` in ms), at most ``max_windows``
    windows (``-r``, at least 3), the CSV report (``--verbose-csv``) to ``csv_path``, ``-v``
    for the per-window lines."""
    command = [str(binary), "-i", transport.protocol, "-u", url, "-m", model,
               "-b", str(batch_size), "-p", str(max(1, round(window_s * 1000))),
               "-r", str(max(MIN_WINDOWS, max_windows)), "-s", f"{stability_percent:g}",
               "-f", str(csv_path), "--verbose-csv", "-v",
               *transport.flags(output_shared_memory_size)]
    if rate is None:
        command += ["--concurrency-range", f"{concurrency}:{concurrency}"]
    else:
        command += ["--request-rate-range", f"{rate:g}:{rate:g}",
                    "--request-distribution", "poisson"]
    if input_data_path is not None:
        command += ["--input-data", str(input_data_path)]
    for name, shape in (shapes or {}).items():
        command += ["--shape", f"{name}:{','.join(map(str, shape))}"]
    return [*command, *extra]


@dataclass
class PerfAnalyzerResult(LoadResult):
    """One load measured by perf_analyzer: load.LoadResult's figures, so that its rows sit
    next to the Python client's, then its own; times in ms, throughput in inferences/s;
    ``pa_protocol`` and ``pa_mode`` are the Transport's.

    ``seconds`` covers the reported windows; ``run_seconds`` the whole run (start-up, every
    window), over which ``client_cpu_percent`` (perf_analyzer's user + system CPU) is
    measured. perf_analyzer stops at the first failed request, so a result has no error:
    a failure raises PerfAnalyzerFailed instead.
    """

    avg_latency_ms: float | None
    run_seconds: float
    #: perf_analyzer's own breakdown of the mean request (ModelStatistics deltas, ms); the
    #: server's side None where it reported none (parse_csv)
    client_send_ms: float
    network_server_ms: float | None
    pa_server_queue_ms: float | None
    pa_server_compute_ms: float | None
    client_recv_ms: float
    pa_protocol: str = "grpc"
    pa_mode: str = "plain"


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_perf_analyzer(analyzer: PerfAnalyzer, url: str, model: str, *, concurrency: int = 1,
                      rate: float | None = None, batch_size: int = 1,
                      inputs: Mapping[str, np.ndarray] | None = None,
                      shapes: Mapping[str, Sequence[int]] | None = None,
                      window_s: float = 3.0, max_windows: int = 6,
                      stability_percent: float = STABILITY_PERCENT,
                      timeout_s: float | None = None,
                      transport: Transport = Transport(),
                      output_shared_memory_size: int | None = None,
                      extra: Sequence[str] = ()) -> PerfAnalyzerResult:
    """Measure ``model`` at ``url`` (host:port of ``transport``'s protocol: the gRPC or the
    HTTP port) with perf_analyzer: closed loop at ``concurrency`` requests in flight, or
    Poisson arrivals at ``rate`` requests/s; each request ``batch_size`` samples of
    ``inputs`` (one sample per input, sent as given; by default perf_analyzer's random data,
    with ``shapes`` for variable dimensions), plainly, streamed or in shared memory as
    ``transport`` says (``output_shared_memory_size``: Transport.flags).

    Windows of ``window_s`` s repeat until the last three agree within
    ``stability_percent``% (throughput and latency) or ``max_windows`` (at least 3) are
    done. When they never agree, perf_analyzer reports nothing; it is then run once more for
    three windows that are reported as they are, with ``stable`` false. ``timeout_s``
    (default: enough for every window plus a minute) bounds each run.

    Raises:
        PerfAnalyzerMissing: the loader could not find a library (the message says how to
            get it).
        PerfAnalyzerFailed: perf_analyzer exited with an error (e.g. an RPC the server lacks:
            ``error: failed to get model metadata: Method not found!``), timed out, or wrote
            no readable CSV.
    """
    what = (f"perf_analyzer{'' if transport == Transport() else f' ({transport.label})'} "
            f"against {url} model {model}")
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as tmp:
        data_path = None
        if inputs:
            data_path = Path(tmp) / "input_data.json"
            data_path.write_text(json.dumps(input_data(inputs)))
        csv_path = Path(tmp) / "report.csv"
        attempts = [(stability_percent, max(MIN_WINDOWS, max_windows)),
                    (ANY_WINDOWS_PERCENT, MIN_WINDOWS)]
        outputs = []
        cpu0, t0 = _children_cpu_seconds(), time.perf_counter()
        for attempt, (percent, windows) in enumerate(attempts):
            command = build_command(analyzer.binary, url, model, csv_path=csv_path,
                                    concurrency=concurrency, rate=rate, batch_size=batch_size,
                                    input_data_path=data_path, shapes=shapes, window_s=window_s,
                                    max_windows=windows, stability_percent=percent,
                                    transport=transport,
                                    output_shared_memory_size=output_shared_memory_size,
                                    extra=extra)
            limit = timeout_s or windows * window_s * 3 + 60
            try:
                result = subprocess.run(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, timeout=limit,
                                        env=analyzer.environment())
            except subprocess.TimeoutExpired as exc:
                output = exc.output if isinstance(exc.output, str) else ""
                raise PerfAnalyzerFailed(
                    f"{what} did not finish in {limit:g} s",
                    -1, output, command) from None
            outputs.append(result.stdout)
            unstable = "Failed to obtain stable measurement" in result.stdout
            if result.returncode == 0 or not unstable or attempt == len(attempts) - 1:
                break
        elapsed = time.perf_counter() - t0
        cpu = _children_cpu_seconds() - cpu0
        output = "\n".join(outputs)
        if result.returncode != 0:
            libraries = _loader_error(result.stdout)
            if libraries:
                raise PerfAnalyzerMissing(describe_missing(libraries, analyzer.binary))
            raise PerfAnalyzerFailed(
                f"{what} failed (exit {result.returncode}): "
                f"{error_lines(result.stdout)}", result.returncode, output, command)
        try:
            rows = parse_csv(csv_path.read_text())
        except (OSError, ValueError) as exc:
            raise PerfAnalyzerFailed(f"{what} exited 0 but its report is unusable: {exc}", 0,
                                     output, command) from None
    row = rows[-1]
    return PerfAnalyzerResult(
        mode="closed" if rate is None else "poisson", concurrency=concurrency, rate=rate,
        samples_per_request=batch_size, windows=len(parse_windows(output)),
        stable=len(outputs) == 1, seconds=round(MIN_WINDOWS * window_s, 2),
        requests=parse_request_count(result.stdout), errors=0, throughput=row.throughput,
        p50_ms=row.p50_ms, p90_ms=row.p90_ms, p95_ms=row.p95_ms, p99_ms=row.p99_ms,
        client_cpu_percent=100 * cpu / elapsed if elapsed else 0.0,
        avg_latency_ms=row.avg_latency_ms, run_seconds=round(elapsed, 2),
        client_send_ms=row.client_send_ms, network_server_ms=row.network_server_ms,
        pa_server_queue_ms=row.server_queue_ms,
        pa_server_compute_ms=None if row.server_compute_infer_ms is None else (
            (row.server_compute_input_ms or 0.0) + row.server_compute_infer_ms
            + (row.server_compute_output_ms or 0.0)),
        client_recv_ms=row.client_recv_ms, pa_protocol=transport.protocol,
        pa_mode=transport.mode,
    )
