"""ONNX Runtime on the CPU: the backend that runs everywhere.

``build`` lets ORT apply all its graph optimisations (DQ -> MatMul fusion into MatMulIntegerToFloat,
LayerNorm/GELU fusion) once and saves the optimised model beside the ONNX; that file, with the bias Adds
moved into the integer GEMMs (``_fuse_gemm_bias``), is the artifact.
4-bit weights reach ORT as INT8 codes (see ``_int4_to_int8``). On a CPU whose u8 x s8 GEMM saturates
(x86 without VNNI/AMX, see :mod:`.cpu`) every INT8 weight is stored as uint8 with zero point 128 (the
same values), so that ORT runs its exact u8 x u8 kernels; the artifact records the CPU it was built for
and refuses to run where its formats would not be exact. The ``tensorrt`` target's int8 activations
(zero point 0) are stored as uint8 with zero point 128 (``_activations_to_uint8``, again the same values):
on x86 ORT fuses no int8-activation Q/DQ into an integer GEMM, so without it every GEMM of such a graph
ran in float32 on dequantized values, whose rounded sums are not the exact integer sums the reference and
TensorRT's INT8 kernels compute. For other models run here (``bench --onnx``),
``session.qdq_matmulnbits_accuracy_level`` 0 keeps a blocked-INT4 MatMulNBits on float activations: its
default re-quantizes them to int8 on the fly, which no fake-quant reference does.
"""

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import replace_atomically
from ..errors import first_line
from . import Artifact, BackendError, LatencyStats
from .cpu import CpuFacts, detect

ARTIFACT_NAME = "model.ort.onnx"
SESSIONS_KEPT = 4


class OrtCpuBackend:
    name = "ort-cpu"

    def __init__(self, threads: int | None = None, cpu: CpuFacts | None = None):
        """``cpu``: build and run as on that CPU instead of this machine (tests force each kind's formats)."""
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BackendError(f"the ort-cpu backend needs onnxruntime ({e}); pip install onnxruntime") from None
        self.threads = threads
        self.cpu = cpu or detect()
        self._sessions: OrderedDict = OrderedDict()

    def options(self, disabled_optimizers: list[str] | None = None) -> dict[str, Any]:
        import onnxruntime as ort

        return {"threads": self.threads, "disabled_optimizers": disabled_optimizers or [],
                "graph_optimization_level": "ORT_ENABLE_ALL", "qdq_matmulnbits_accuracy_level": 0,
                "onnxruntime": ort.__version__}

    def _session(self, model: Path | bytes, optimized_out: Path | None = None, options: dict | None = None,
                 name: Path | None = None, profile_prefix: Path | None = None):
        import onnxruntime as ort

        options = options or self.options()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        so.log_severity_level = 3
        if options.get("threads"):
            so.intra_op_num_threads = options["threads"]
        if optimized_out is not None:
            so.optimized_model_filepath = str(optimized_out)
        if profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        try:
            return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=options.get("disabled_optimizers") or [])
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types for a bad file
            first = first_line(e)
            raise BackendError(f"{name or model}: ONNX Runtime cannot load this model: {first}") from None

    def build(self, onnx_path: Path, out_dir: Path) -> Artifact:
        """Optimise once and save the result; the artifact's size is the ONNX file's, which is what ships
        (ONNX Runtime optimises a model when it loads it; the saved optimised graph is a load-time cache)."""
        import onnx

        model = _load(Path(onnx_path))
        options = self.prepare(model)
        out = Path(out_dir) / ARTIFACT_NAME
        self._session(model.SerializeToString(), optimized_out=out, options=options, name=Path(onnx_path))
        optimised = _load(out)
        options["gemm_bias_fused"] = _fuse_gemm_bias(optimised)
        replace_atomically(out, lambda tmp: onnx.save(optimised, str(tmp)))
        return Artifact(out, self.name, options, Path(onnx_path).stat().st_size)

    def prepare(self, model) -> dict[str, Any]:
        """The rewrites of ``model`` (in place) that ONNX Runtime needs before it optimises: INT4 weights as
        INT8 codes, GEMMs on two-grid (V-2SF) inputs as integer GEMMs (:mod:`.ort_split_codes`), and on a CPU
        without exact u8 x s8 kernels INT8 weights as uint8. Returns the session options with what was done,
        for the artifact."""
        from ..onnx_graph import Graph
        from .ort_patchify import patchify_convs
        from .ort_split_codes import split_code_matmuls

        options = self.options()
        g = Graph(model)
        options |= {"int4_weights_on_int8_kernels": _int4_to_int8(g), "cpu": self.cpu.to_dict()}
        int8_activations = _activations_to_uint8(g)
        options["patchify_integer_gemms"] = patchify_convs(g)
        options["two_grid_integer_gemms"] = split_code_matmuls(g)
        weights = int8_weight_readers(g)
        options |= {"integer_weights": len({n.input[i] for n, i, _ in weights}),
                    "activation_format": "s8" if int8_activations else "u8", "activations_as_uint8": int8_activations,
                    "weight_format": self.cpu.weight_format,
                    "weights_as_uint8": _weights_to_uint8(g, weights) if self.cpu.weight_format == "u8" else 0}
        return options

    def run_onnx(self, model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run an in-memory ONNX model (rewritten in place) as ``build``'s artifacts run: the same rewrites and
        session options; for comparing parts of a model (see pomq_deploy.verify.worst_block)."""
        options = self.prepare(model)
        return self._session(model.SerializeToString(), options=options).run(None, feeds)

    def run(self, artifact: Artifact, images: np.ndarray) -> np.ndarray:
        sess = self._cached(artifact)
        return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    def latency(self, artifact: Artifact, batch: int, runs: int = 50, warmup: int = 10) -> LatencyStats:
        sess = self._cached(artifact)
        feed = random_feeds(sess.get_inputs(), batch, artifact.path)
        _run_once(sess, feed, artifact.path)
        for _ in range(warmup - 1):
            sess.run(None, feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        return LatencyStats.from_times(batch, times)

    def profile(self, artifact: Artifact, batch: int, runs: int, out_prefix: Path, warmup: int = 10) -> Path:
        """Run ``warmup`` then ``runs`` inferences in a fresh session with ONNX Runtime's profiler on; return
        the trace it wrote (``<out_prefix>_<time>.json``). The profiler starts with its session, and a session
        warmed up without it would not be the one measured, so the warm-up runs are in the trace: drop them by
        run index (``pomq_deploy.profiling.ort_trace.summarize``)."""
        check_cpu(artifact, self.cpu)
        sess = self._session(artifact.path, options=artifact.options, profile_prefix=out_prefix)
        feed = random_feeds(sess.get_inputs(), batch, artifact.path)
        _run_once(sess, feed, artifact.path)
        for _ in range(warmup + runs - 1):
            sess.run(None, feed)
        return Path(sess.end_profiling())

    def artifact_note(self, artifact: Artifact) -> str | None:
        """Refuse an artifact this CPU would compute wrongly; a note when it was built for another CPU kind."""
        return check_cpu(artifact, self.cpu)

    def _cached(self, artifact: Artifact):
        """A session per artifact file, reused across calls (creating one re-optimises the graph); the few
        most recent are kept, so that a search over hundreds of artifacts does not hold them all."""
        key = (str(artifact.path), artifact.path.stat().st_mtime_ns)
        if key not in self._sessions:
            check_cpu(artifact, self.cpu)
            self._sessions[key] = self._session(artifact.path, options=artifact.options)
            while len(self._sessions) > SESSIONS_KEPT:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(key)
        return self._sessions[key]


def describe_formats(options: dict[str, Any]) -> str:
    """One line: the integer formats an ort-cpu build or run used (``prepare``'s options) and why."""
    cpu = CpuFacts.from_dict(options["cpu"])
    acts = ("int8 (the tensorrt target's) stored as uint8 + 128, the same values: ORT fuses no int8-activation GEMM on x86"
            if options.get("activations_as_uint8") else "uint8")
    weights = ("int8: u8 x s8 is exact on this CPU kind" if options["weight_format"] == "s8"
               else "int8 stored as uint8 + 128: u8 x s8 saturates in int16 on this CPU kind")
    return (f"integer GEMMs for {cpu.model}: activations {acts}; weights {weights}; patch embedding "
            f"{'as an integer GEMM' if options.get('patchify_integer_gemms') else 'a float Conv'}")


def check_cpu(artifact: Artifact, here: CpuFacts) -> str | None:
    """Refuse an artifact whose integer weights are not exact on ``here`` (one line naming both CPUs); for
    one built on another CPU kind that is still exact here, a note saying so (None: nothing to say)."""
    built = artifact.options.get("cpu")
    if built is None:  # built before artifacts recorded their CPU: int8 weights, u8 x s8 kernels
        if here.exact_u8s8:
            return None
        raise BackendError(f"{artifact.path.parent}: built by an earlier pomq-deploy that did not record its CPU; its "
                           f"int8 weights may saturate in int16 on this CPU, {here.describe()}; rebuild it with pomq-deploy build")
    built = CpuFacts.from_dict(built)
    fmt = artifact.options["weight_format"]
    if not artifact.options.get("integer_weights"):
        return None
    if fmt == "s8" and not here.exact_u8s8:
        raise BackendError(f"{artifact.path.parent}: built on {built.describe()} with u8 x s8 integer GEMMs, which "
                           f"saturate in int16 on this CPU, {here.describe()}; rebuild it here with pomq-deploy build")
    if fmt == here.weight_format:
        return None
    return (f"built on {built.describe()} (weights {fmt}); this CPU, {here.describe()}, would build weights "
            f"{here.weight_format}: its integer results are exact here too, its latency was measured there")


def _weights_to_uint8(g, readers: list) -> int:
    """Each INT8 weight read by ``readers`` (of Graph ``g``: ``int8_weight_readers``) as uint8 codes + 128 with
    zero point + 128 (default 0).

    ``(q + 128) - (z + 128) = q - z``: the same values. ONNX Runtime then fuses the GEMMs into its u8 x u8
    kernels, exact on every x86 CPU, instead of u8 x s8, which saturates where VNNI/AMX is missing (see
    :mod:`.cpu`). Returns how many weights were rewritten."""
    from onnx import numpy_helper

    shifted: dict[str, tuple[str, str]] = {}  # int8 initializer -> (uint8 codes, uint8 zero point) names
    for node, codes_at, zero_at in readers:
        name = node.input[codes_at]
        zero_name = node.input[zero_at] if len(node.input) > zero_at and node.input[zero_at] else None
        key = (name, zero_name)
        if key not in shifted:
            codes = numpy_helper.to_array(g.inits[name])
            width = codes.shape[1] if node.op_type == "MatMulInteger" else g.value(node.input[1]).shape
            zero = g.value(zero_name) if zero_name else np.zeros(width, np.int8)
            u8 = numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), f"{name}_u8")
            zero_u8 = numpy_helper.from_array((zero.astype(np.int16) + 128).astype(np.uint8), f"{u8.name}_zero")
            g.replace_initializer(None, u8)
            g.replace_initializer(None, zero_u8)
            shifted[key] = (u8.name, zero_u8.name)
        inputs = list(node.input) + [""] * (zero_at + 1 - len(node.input))
        inputs[codes_at], inputs[zero_at] = shifted[key]
        g.set_inputs(node, inputs)
    g.drop_unused()
    return len(shifted)


def int8_weight_readers(g) -> list:
    """(node, codes input, zero point input) of each node that reads an INT8 initializer as integer weights:
    DequantizeLinear (activations come from a QuantizeLinear instead) and MatMulInteger's B
    (``split_code_matmuls``)."""
    import onnx

    slots = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3)}
    return [(n, *slots[n.op_type]) for n in g.graph.node if n.op_type in slots and n.input[slots[n.op_type][0]] in g.inits
            and g.inits[n.input[slots[n.op_type][0]]].data_type == onnx.TensorProto.INT8]


FEED_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16,
               "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(uint32)": np.uint32,
               "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}
FEED_BYTES_MAX = 2 << 30  # what one timing run may feed: more is a model this tool cannot time on 24 GiB


def random_feeds(inputs, batch: int, where: Path) -> dict[str, np.ndarray]:
    """Seeded inputs for timing a model with ONNX Runtime ``inputs`` (``session.get_inputs()``) at ``batch``:
    normal noise for float inputs, zeros for integer and boolean ones (an index input must stay in range). A
    symbolic first dimension is the batch (a fixed one is kept: a table, or a model built for one batch, which
    must then be ``batch``); any other dimension must be fixed in the model, and one line says which is not (a
    model of any origin reaches ``bench --onnx``)."""
    if not inputs:
        raise BackendError(f"{where}: the model has no inputs to feed")
    rng, feeds, total = np.random.default_rng(0), {}, 0
    for inp in inputs:
        dtype = FEED_DTYPES.get(inp.type)
        if dtype is None:
            raise BackendError(f"{where}: input {inp.name!r} is a {inp.type}; timing feeds tensors of "
                               f"{', '.join(t[7:-1] for t in FEED_DTYPES)}")
        shape = list(inp.shape or [])
        if not shape:
            raise BackendError(f"{where}: input {inp.name!r} has no dimensions in the model (a scalar, or its shape left unset): "
                               f"no batch dimension to time")
        if inp is inputs[0] and all(_fixed(i.shape[0]) for i in inputs if i.shape) and shape[0] != batch:
            raise BackendError(f"{where}: input {inp.name!r} has a fixed batch of {shape[0]}; time it with --batch {shape[0]}")
        free = [i for i, d in enumerate(shape[1:], 1) if not _fixed(d)]
        if free:
            raise BackendError(f"{where}: input {inp.name!r} has dimension(s) {free} of no fixed size "
                               f"({[shape[i] for i in free]}); timing needs every dimension but the batch fixed")
        shape[0] = shape[0] if _fixed(shape[0]) else batch
        total += int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        if total > FEED_BYTES_MAX:
            raise BackendError(f"{where}: its inputs at batch {batch} take more than {FEED_BYTES_MAX >> 30} GiB "
                               f"(input {inp.name!r} is {shape}); timing feeds at most that")
        feeds[inp.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype) if np.issubdtype(dtype, np.floating) \
            else np.zeros(shape, dtype)
    return feeds


def _fixed(dim) -> bool:
    return isinstance(dim, int) and dim >= 0


def _run_once(sess, feed: dict[str, np.ndarray], where: Path) -> None:
    """The first run, whose failure (a shape the model's own ops refuse, memory) is one line, not ORT's trace."""
    try:
        sess.run(None, feed)
    except Exception as e:  # ORT raises Fail/InvalidArgument/RuntimeException/... for a model that cannot run
        first = first_line(e)
        raise BackendError(f"{where}: ONNX Runtime cannot run this model at the fed shapes: {first}") from None


def _load(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise BackendError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _fuse_gemm_bias(model) -> int:
    """``MatMulIntegerToFloat -> Add(bias)``  ==>  ``MatMulIntegerToFloat(..., bias)``.

    ORT 1.32 fuses DQ -> MatMul into MatMulIntegerToFloat but leaves a Linear's bias as a separate Add, one
    more pass over every GEMM output (36 Adds per run of the reference model). The contrib op takes the
    bias as its optional seventh input and adds it in the GEMM's output stage: measured bit-identical
    logits and 7% less latency on the reference model at batch 8. Returns how many Adds were folded."""
    from ..onnx_graph import Graph

    g = Graph(model)
    done = 0
    for mm in [n for n in g.graph.node if n.op_type == "MatMulIntegerToFloat" and len(n.input) <= 6]:
        users = g.consumers(mm.output[0])
        if len(users) != 1 or users[0].op_type != "Add" or mm.output[0] in g.outputs:
            continue
        add = users[0]
        bias = add.input[0] if add.input[1] == mm.output[0] else add.input[1]
        value, width = g.value(bias), _output_width(g, mm)
        if value is None or value.ndim != 1 or width is None or value.shape[0] != width:
            continue
        out = add.output[0]
        g.remove(add)
        g.set_inputs(mm, list(mm.input) + [""] * (6 - len(mm.input)) + [bias])
        g.set_output(mm, 0, out)
        done += 1
    return done


def _output_width(g, mm) -> int | None:
    """N of MatMulIntegerToFloat's (.., K) x (K, N) product, from its constant B (None if B is not constant)."""
    b = g.value(mm.input[1])
    return None if b is None or b.ndim != 2 else int(b.shape[1])


def _int4_to_int8(g) -> int:
    """Store INT4 weight codes of Graph ``g`` as INT8 (the same integers) so ORT runs them in its INT8 GEMM kernels.

    ORT 1.32's CPU kernels have no int4 x uint8 GEMM: an INT4 per-channel DequantizeLinear stays a float
    dequantization on every run, measured 2x slower than the INT8 plan on the reference model. The codes
    and so the numbers are unchanged; only the deployable model.onnx keeps the 4-bit storage. Blocked scales
    whose blocks repeat one scale per column (the ``tensorrt`` target's INT4 form, see
    ``export.graph.block_int4_scales``) become that per-column scale again: ORT fuses a blocked INT8
    DequantizeLinear into its integer GEMM as if the scale were per column, and fails at run time. An INT4
    weight with truly blocked scales stays INT4 (a float dequantization)."""
    import onnx
    from onnx import numpy_helper

    from ..onnx_graph import node_attr

    n = 0
    for dq in [d for d in g.graph.node if d.op_type == "DequantizeLinear" and d.input[0] in g.inits]:
        codes = g.inits[dq.input[0]]
        if codes.data_type != onnx.TensorProto.INT4:
            continue
        if node_attr(dq, "block_size", 0):
            scale = g.value(dq.input[1])
            if scale is None or scale.ndim != 2 or node_attr(dq, "axis", 1) != 0 or len(dq.input) > 2 \
                    or not (scale == scale[:1]).all():
                continue
            per_column = numpy_helper.from_array(np.ascontiguousarray(scale[0]), f"{dq.input[1]}_per_column")
            g.replace_initializer(None, per_column)
            g.set_input(dq, 1, per_column.name)
            for a in [a for a in dq.attribute if a.name in ("axis", "block_size")]:
                dq.attribute.remove(a)
            dq.attribute.append(onnx.helper.make_attribute("axis", 1))
        g.replace_initializer(codes.name, numpy_helper.from_array(numpy_helper.to_array(codes).astype("int8"), codes.name))
        n += 1
    g.drop_unused()
    return n


def _activations_to_uint8(g) -> int:
    """Each int8 activation Q/DQ (the ``tensorrt`` target's symmetric format) of Graph ``g`` as uint8 with its
    zero point + 128: ``clamp(round(x/s) + z + 128, 0, 255) - (z + 128)`` is the int8 code, so the values are
    the same. Measured (tests/test_cpu_formats.py, on every x86 CPU kind): ONNX Runtime fuses no int8-activation
    GEMM on x86 (its QDQ selectors take int8 activations only on Arm) and runs it in float32 on the dequantized
    values, whose rounded sums differ from the exact integer ones in the last bits; those flip codes downstream
    (logits cosine 0.9958 on an AVX2 CPU's calibration of the test model). As uint8 the GEMMs run as integer
    kernels, exactly, as TensorRT's INT8 kernels do. Returns how many zero points were rewritten."""
    import onnx
    from onnx import numpy_helper

    shifted: dict[str, str] = {}  # int8 zero point -> its uint8 twin
    codes: list[str] = []
    for node in list(g.graph.node):
        reads_codes = node.op_type == "DequantizeLinear" and node.input[0] not in g.inits and g.tensor(node.input[0]) is None
        if not (node.op_type == "QuantizeLinear" or reads_codes) or len(node.input) < 3 or not node.input[2]:
            continue
        zero = g.tensor(node.input[2])
        if zero is None or zero.data_type != onnx.TensorProto.INT8:
            continue
        if node.input[2] not in shifted:
            value = numpy_helper.to_array(zero).astype(np.int16) + 128
            twin = numpy_helper.from_array(value.astype(np.uint8), f"{node.input[2]}_u8")
            g.replace_initializer(None, twin)
            shifted[node.input[2]] = twin.name
        g.set_input(node, 2, shifted[node.input[2]])
        if node.op_type == "QuantizeLinear":
            codes.append(node.output[0])
    stale = set(codes)  # the codes' declared types (int8) follow them through shape ops: drop those declarations
    while codes:
        for user in g.consumers(codes.pop()):
            if user.op_type != "DequantizeLinear" and user.output[0] not in stale:
                stale.add(user.output[0])
                codes.append(user.output[0])
    kept = [v for v in g.graph.value_info if v.name not in stale]
    del g.graph.value_info[:]
    g.graph.value_info.extend(kept)
    g.drop_unused()
    return len(shifted)
