"""The only module that imports ``tensorrt``: build, inspect, time and load engines.

In:  a :class:`BuildPlan` (everything decided before TensorRT is touched), the timing-cache
     bytes, engine bytes and numpy feeds.
Out: :class:`TrtBuild` (serialized engine, inspector JSON, new timing cache, log lines),
     latency samples, load verdicts.

Written against TensorRT 10 and 11 (names checked against the 11.1 Python bindings and the
10.x docs; see docs/engines.md): strongly typed networks (flag set where it exists: required on
10, ignored on 11; EXPLICIT_BATCH never), no precision builder flags or calibrators (removed in
11), ``OnnxParser.parse_from_file`` so external weights resolve, ProfilingVerbosity.DETAILED for
the inspector. Running engines goes through Polygraphy's TrtRunner, which owns device buffers.

NOT YET RUN ON A GPU in this project: every line here is unverified against a real TensorRT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtforge._deps import require
from trtforge.engines.plan import BuildPlan, HardwareCompatibility
from trtforge.errors import BuildError

trt = require("tensorrt")

_SEVERITY = {
    trt.ILogger.Severity.INTERNAL_ERROR: "internal error",
    trt.ILogger.Severity.ERROR: "error",
    trt.ILogger.Severity.WARNING: "warning",
    trt.ILogger.Severity.INFO: "info",
    trt.ILogger.Severity.VERBOSE: "verbose",
}


class _Logger(trt.ILogger):
    """Keeps warnings and errors: TensorRT reports failures as None plus log lines."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self.lines: list[str] = []

    def log(self, severity, msg):  # noqa: D401 (TensorRT's callback name)
        if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING):
            self.lines.append(f"{_SEVERITY.get(severity, severity)}: {msg}")

    def errors(self) -> list[str]:
        return [x for x in self.lines if not x.startswith("warning")]


@dataclass
class TrtBuild:
    engine: bytes
    layers: dict
    timing_cache: bytes
    version: str
    io: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    build_s: float = 0.0


def version() -> str:
    return str(trt.__version__)


_HW = {
    HardwareCompatibility.NONE: "NONE",
    HardwareCompatibility.AMPERE_PLUS: "AMPERE_PLUS",
    HardwareCompatibility.SAME_COMPUTE_CAPABILITY: "SAME_COMPUTE_CAPABILITY",
}


def _network_flags() -> int:
    st = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(st)) if st is not None else 0


def _parse(parser, path: Path) -> None:
    ok = parser.parse_from_file(str(path))
    if ok and parser.num_errors == 0:
        return
    errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    first = errs[0] if errs else "unknown parser error"
    raise BuildError(f"TensorRT's ONNX parser rejected {path.name}: {first}"
                     + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""),
                     "see the error's node; unsupported Q/DQ layouts are the usual cause")


def _engine_io(engine) -> list[dict]:
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append({"name": name, "mode": str(engine.get_tensor_mode(name)).split(".")[-1],
                    "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1],
                    "shape": [int(d) for d in engine.get_tensor_shape(name)]})
    return out


def build(plan: BuildPlan, timing_cache: bytes) -> TrtBuild:
    """Parse, configure and build; raises BuildError with TensorRT's own messages on failure."""
    logger = _Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags())
    parser = trt.OnnxParser(network, logger)
    _parse(parser, plan.onnx_path)

    config = builder.create_builder_config()
    o = plan.options
    if o.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, o.workspace_mib * (1 << 20))
    config.builder_optimization_level = o.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if o.hardware_compatibility != HardwareCompatibility.NONE:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, _HW[o.hardware_compatibility])
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))

    if plan.profile.inputs:  # a fully static network needs (and accepts) no profile
        profile = builder.create_optimization_profile()
        for shape in plan.profile.inputs:
            profile.set_shape(shape.name, shape.min, shape.opt, shape.max)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError("TensorRT rejected the optimization profile", "check the --profile ranges against the model")

    cache = config.create_timing_cache(timing_cache or b"")
    if not config.set_timing_cache(cache, False):
        # A device mismatch (trtforge's sidecar check should have caught it): start fresh.
        logger.lines.append("warning: timing cache rejected by TensorRT; using a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if serialized is None:
        errs = logger.errors() or ["build_serialized_network returned None"]
        raise BuildError(f"TensorRT could not build the engine: {errs[0]}",
                         "see the messages above; a Q/DQ node TensorRT cannot fuse or an unsupported op is the usual cause")
    engine_bytes = bytes(serialized)
    new_cache = bytes(config.get_timing_cache().serialize())

    runtime = trt.Runtime(logger)
    if o.version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BuildError(f"the engine just built does not deserialize: {(logger.errors() or ['no message'])[0]}",
                         "report this TensorRT problem")
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return TrtBuild(engine_bytes, layers, new_cache, version(), _engine_io(engine), list(logger.lines), build_s)


def _runner(engine_bytes: bytes, version_compatible: bool):
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runtime = trt.Runtime(_Logger())
    if version_compatible:
        runtime.engine_host_code_allowed = True
    return TrtRunner(EngineFromBytes(engine_bytes, runtime=runtime))


def measure(engine_bytes: bytes, feeds: dict[str, np.ndarray], *, iterations: int = 50, warmup: int = 5,
            version_compatible: bool = False) -> list[float]:
    """Latency samples in ms at the feeds' shapes (outputs stay on the device)."""
    samples = []
    with _runner(engine_bytes, version_compatible) as runner:
        for _ in range(warmup):
            runner.infer(feeds, copy_outputs_to_host=False)
        for _ in range(iterations):
            runner.infer(feeds, copy_outputs_to_host=False)
            samples.append(runner.last_inference_time() * 1000.0)
    return samples


def run(engine_bytes: bytes, feeds: dict[str, np.ndarray], *, version_compatible: bool = False) -> dict[str, np.ndarray]:
    with _runner(engine_bytes, version_compatible) as runner:
        return {k: np.array(v) for k, v in runner.infer(feeds).items()}


def try_deserialize(engine_bytes: bytes, version_compatible: bool) -> tuple[bool, str]:
    logger = _Logger()
    runtime = trt.Runtime(logger)
    if version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        return False, (logger.errors() or ["deserialize_cuda_engine returned None"])[0]
    return True, f"TensorRT {version()} deserialized the engine"
