"""Optional fp16 version of an exported fp32 graph (either family), for GPU speed.

The conversion itself is ONNX Runtime's own converter (`onnxruntime.transformers.float16`); this module only
decides which nodes stay fp32 and tidies the casts the converter leaves around them. fp32 I/O is kept (`mix` in,
`stems` out), so a runner feeds and reads the same arrays as for the fp32 graph.

What stays fp32 was decided by measurement (`python -m ripper_export.fp16`, SDR of fp16 vs fp32 output on a
music-like chunk, random weights): a naive whole-graph conversion of htdemucs gives 1 dB (small) and -9 dB
(released size); with the rules below 64.6 / 66.0 dB, small RoFormers 64-69 dB, Mel-Band RoFormer at the vocals
configuration 61 dB. Everything else, including all the convolutions, the attention and feed-forward matmuls,
activations, Softmax and the fused norm ops, runs in fp16. Each rule's "without" figure below is the SDR when only
that part is converted too.

- prologue and epilogue: every node that depends on the input and lies before the first fp16 Conv/MatMul (padding,
  the STFT, htdemucs' input mean/std normalisation: 1.3 dB without) or after the last one (masks and complex
  multiply, un-normalisation, ISTFT, the final sum). A few percent of the FLOPs.
- `/stft/` and `/istft/` module scopes (the real DFT, framing and overlap-add of export/stft.py) wherever they sit:
  they cost 2-7 dB on RoFormers and about 2 dB on htdemucs in fp16.
- norms written out of reductions, as whole module scopes (node name prefix): any scope holding a ReduceSum/
  ReduceMean/ReduceL2 (htdemucs' staged-sum GroupNorm over long time axes: 9 dB without; RoFormer's RMSNorm, whose
  `normalize` overflows in fp16 at real activation sizes). x - mean, the squares and the division stay fp32 too.
- not blocked, measured harmless: InstanceNormalization/LayerNormalization (0.7 dB on released htdemucs, none on the
  small ones; ORT's kernels accumulate fp16 in fp32) and Softmax (no measurable change; its logits come from an
  fp16 MatMul anyway).

Blocked regions are made fully fp32: constant subgraphs that feed only blocked nodes stay fp32, and the converter's
fp32 -> fp16 -> fp32 cast pairs between two blocked nodes are removed. Without that removal every blocked node's
result is rounded to fp16 before the next one reads it, and htdemucs' staged sums of squares overflow (inf output).
"""
from __future__ import annotations

import argparse
import heapq
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .metrics import sdr_db
import onnx
from onnx import TensorProto, helper

#: Ops always computed in fp32: reductions (long sums of squares overflow fp16, and lose precision).
FP32_OPS = frozenset({"ReduceSum", "ReduceMean", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"})
#: Ops that make their whole module scope fp32: a norm written out of reductions, where subtract, square,
#: divide and affine around the reduction matter as much as the reduction itself.
NORM_SCOPE_OPS = FP32_OPS
#: Module scopes (node name substrings) kept fp32: the real DFT, framing and overlap-add of export/stft.py.
FP32_SCOPES = ("/stft/", "/istft/")
#: The heavy ops fp16 is for; the prologue/epilogue is what lies before the first / after the last of them.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})

FAMILIES = ("htdemucs", "mel_band_roformer", "bs_roformer")


def _scope(name: str) -> str:
    """`/a/b/Op_3` -> `/a/b/`; the root scope `/` (or an unscoped name) -> ''."""
    if "/" not in name:
        return ""
    s = name[:name.rindex("/") + 1]
    return "" if s == "/" else s


def _in_fp32_scope(name: str) -> bool:
    return any(s in name for s in FP32_SCOPES)


def fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes `to_fp16` keeps in fp32 (the rules in the module docstring).

    Node names must be unique and non-empty (torch's exporter names every node by its module scope); unnamed
    nodes are named first by `to_fp16`.
    """
    g = model.graph
    nodes = list(g.node)
    norm_scopes = {_scope(n.name) for n in nodes if n.op_type in NORM_SCOPE_OPS} - {""}
    blocked = {n.name for n in nodes
               if n.op_type in FP32_OPS or _in_fp32_scope(n.name)
               or (_scope(n.name) in norm_scopes and n.op_type not in COMPUTE_OPS)}

    producer = {o: n for n in nodes for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            if i:
                consumers[i].append(n)
    anchors = [n for n in nodes if n.op_type in COMPUTE_OPS and n.name not in blocked]

    def reach(start, step) -> set[str]:
        seen: set[str] = set()
        stack = list(start)
        while stack:
            for nxt in step(stack.pop()):
                if nxt.name not in seen:
                    seen.add(nxt.name)
                    stack.append(nxt)
        return seen

    def users(n):
        return [c for o in n.output for c in consumers.get(o, ())]

    def producers(n):
        return [producer[i] for i in n.input if i in producer]

    # nodes that depend on the input; constant subgraphs (weights, shapes) are never prologue or epilogue
    dynamic = reach([c for i in g.input for c in consumers.get(i.name, ())], users)
    dynamic |= {c.name for i in g.input for c in consumers.get(i.name, ())}
    after = reach(anchors, users)        # descendants of an fp16 anchor
    before = reach(anchors, producers)   # ancestors of one
    anchor_names = {n.name for n in anchors}
    for n in nodes:
        if n.name in dynamic and n.name not in anchor_names and (n.name not in after or n.name not in before):
            blocked.add(n.name)

    # constant subgraphs whose every consumer is fp32 stay fp32 (e.g. a DFT matrix held in a Constant node),
    # walking back from the consumers so that a chain Constant -> Unsqueeze -> fp32 node stays fp32 as a whole
    changed = True
    while changed:
        changed = False
        for n in reversed(nodes):
            if n.name in blocked or n.name in dynamic:
                continue
            u = users(n)
            if u and all(c.name in blocked for c in u):
                blocked.add(n.name)
                changed = True
    return blocked


def _name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.name or n.op_type}__fp16_{i}"
        seen.add(n.name)


def _elem_types(g: onnx.GraphProto) -> dict[str, int]:
    types = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            types[n.output[0]] = to
    return types


def _cast_to(n: onnx.NodeProto) -> int | None:
    if n.op_type != "Cast":
        return None
    return next((a.i for a in n.attribute if a.name == "to"), None)


def _remove_cast_round_trips(model: onnx.ModelProto) -> int:
    """Bypass Cast(fp32->fp16) -> Cast(fp16->fp32): consumers read the fp32 tensor. Returns casts removed."""
    g = model.graph
    types = _elem_types(g)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    for n in g.node:
        if _cast_to(n) != TensorProto.FLOAT:
            continue
        p = producer.get(n.input[0])
        if p is None or _cast_to(p) != TensorProto.FLOAT16 or types.get(p.input[0]) != TensorProto.FLOAT:
            continue
        rename[n.output[0]] = p.input[0]
    if not rename:
        return 0
    keep = []
    for n in g.node:
        if n.op_type == "Cast" and n.output[0] in rename and n.output[0] in outputs:
            # a graph output keeps its name: the round trip becomes an Identity of the fp32 tensor
            src = rename.pop(n.output[0])
            keep.append(helper.make_node("Identity", [src], [n.output[0]], name=n.name))
            continue
        if n.op_type == "Cast" and n.output[0] in rename:
            continue
        keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    removed = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(keep)
    return removed


def _dedupe_and_prune(model: onnx.ModelProto) -> None:
    """Drop duplicate Cast nodes (same input, same target, same output name) and nodes nothing reads."""
    g = model.graph
    seen, nodes = set(), []
    for n in g.node:
        if n.op_type == "Cast":
            key = (n.input[0], _cast_to(n), n.output[0])
            if key in seen:
                continue
            seen.add(key)
        nodes.append(n)
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(_toposort(nodes, g)):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:  # subgraphs read outer names
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    needed.update(i for sn in sub.node for i in sn.input)
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    vis = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vis)
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def _toposort(nodes: list[onnx.NodeProto], g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's order, stable (original order among ready nodes): the converter appends its casts at the end."""
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    producer_of = {o: idx for idx, n in enumerate(nodes) for o in n.output}
    deps = []
    users: dict[int, list[int]] = defaultdict(list)
    for idx, n in enumerate(nodes):
        d = {producer_of[i] for i in n.input if i not in available and i in producer_of}
        deps.append(len(d))
        for p in d:
            users[p].append(idx)
    ready = [idx for idx, c in enumerate(deps) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        idx = heapq.heappop(ready)
        order.append(nodes[idx])
        for u in users[idx]:
            deps[u] -= 1
            if deps[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle or reads an undefined tensor")
    return order


def to_fp16(model: onnx.ModelProto, *, extra_fp32_nodes: Iterable[str] = (), naive: bool = False) -> onnx.ModelProto:
    """fp16 copy of an exported fp32 graph: fp32 `mix` in and `stems` out, precision-sensitive parts fp32.

    `extra_fp32_nodes`: more node names to keep fp32. `naive`: convert everything (only for comparisons; the
    result is far less accurate). Metadata is kept, plus ``ripper.precision`` = ``fp16``. The input is not changed.
    ValueError for a graph that is already fp16 or lacks a known ``ripper.family``. The graph must fit in one
    protobuf (< 2 GB with its weights loaded), as onnx's shape inference and checker need; every model here does.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("ripper.precision", "fp32") != "fp32":
        raise ValueError(f"graph is already {meta['ripper.precision']}")
    if meta.get("ripper.family") not in FAMILIES:
        # the rules rely on these exporters' module-scope node names (/stft/, norm scopes)
        raise ValueError(f"ripper.family {meta.get('ripper.family')!r} is not one of {FAMILIES}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m)
    blocked = set() if naive else fp32_nodes(m) | set(extra_fp32_nodes)
    # op_block_list=[] (not None): the converter's default list holds ML ops only, none of them in these graphs
    out = convert_float_to_float16(m, keep_io_types=True, op_block_list=[], node_block_list=sorted(blocked),
                                   disable_shape_infer=False)
    _remove_cast_round_trips(out)
    _dedupe_and_prune(out)
    del out.metadata_props[:]
    meta["ripper.precision"] = "fp16"
    onnx.helper.set_model_props(out, meta)
    onnx.checker.check_model(out, full_check=False)
    return out


def node_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> 'fp16' | 'fp32' | 'other', by the float type of the node's first float input or output.

    Casts count as 'other'. Uses onnx type inference on a copy.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = _elem_types(inferred.graph)
    out = {}
    for n in model.graph.node:
        kind = "other"
        if n.op_type != "Cast":
            for name in list(n.input) + list(n.output):
                t = types.get(name)
                if t == TensorProto.FLOAT16:
                    kind = "fp16"
                    break
                if t == TensorProto.FLOAT:
                    kind = "fp32"
                    break
        out[n.name] = kind
    return out


def precision_summary(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """{'fp16'|'fp32': {op_type: count}} for the float-computing nodes (Constants, shapes and Casts left out)."""
    prec = node_precisions(model)
    skip = {"Constant", "ConstantOfShape", "Shape", "Cast", "Identity"}
    summary: dict[str, dict[str, int]] = {"fp16": defaultdict(int), "fp32": defaultdict(int)}
    for n in model.graph.node:
        k = prec[n.name]
        if k in summary and n.op_type not in skip:
            summary[k][n.op_type] += 1
    return {k: dict(sorted(v.items())) for k, v in summary.items()}


def _session(model, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (
        model if isinstance(model, bytes) else str(model))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def fp16_sdr(fp32_model, fp16_model, inputs) -> float:
    """SDR (dB) of the fp16 graph's output against the fp32 graph's on the same input, both in ONNX Runtime (CPU).

    Models: ModelProto, serialised bytes or a path. `inputs`: the `mix` array or a feed dict. NaN/inf -> -inf.
    The CPU number is an estimate of the GPU's: the tensors between nodes are rounded to fp16 exactly as on a GPU,
    but ORT's CPU EP has no fp16 kernel for many ops (it inserts casts and computes them in fp32) while others
    run in fp16 on the CPU (MLAS); a GPU's tensor cores accumulate matmuls and convolutions in fp32. Check on the
    target GPU before relying on a number near a threshold.
    """
    feed = inputs if isinstance(inputs, Mapping) else {"mix": np.asarray(inputs, np.float32)}
    ref = _session(fp32_model).run(None, feed)[0]
    est = _session(fp16_model).run(None, feed)[0]
    return sdr_db(ref, est)


def music_like(batch: int, channels: int, samples: int, *, sample_rate: int = 44100, seed: int = 0,
               dbfs: float = -20.0) -> np.ndarray:
    """A music-like test signal `(batch, channels, samples)`: harmonic tones with decaying partials, note changes
    and vibrato, a bass line, noise bursts (drums) and a little broadband noise, at `dbfs` RMS. White noise alone
    is a poor test: its flat spectrum hides the dynamic range that fp16 loses in quiet bins."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    out = np.zeros((batch, channels, samples))
    for b in range(batch):
        sig = np.zeros((channels, samples))
        for voice in range(4):
            f0 = 55.0 * 2 ** (rng.integers(0, 36) / 12)
            note = max(1, int(sample_rate * rng.uniform(0.2, 0.6)))
            for start in range(0, samples, note):
                seg = slice(start, min(samples, start + note))
                tt = t[seg] - t[start]
                f = f0 * 2 ** (rng.integers(-5, 8) / 12)
                env = np.exp(-tt * rng.uniform(1, 6))
                vib = 1 + 0.003 * np.sin(2 * np.pi * 5.5 * tt)
                tone = sum((0.6 ** k) * np.sin(2 * np.pi * f * (k + 1) * vib * tt + rng.uniform(0, 6.3))
                           for k in range(8) if f * (k + 1) < sample_rate / 2)
                pan = rng.uniform(0.3, 1.0, channels)
                sig[:, seg] += pan[:, None] * env * tone
        beat = int(sample_rate * 0.25)
        for start in range(0, samples, beat):
            n = min(beat // 4, samples - start)
            burst = rng.standard_normal((channels, n)) * np.exp(-np.arange(n) / (0.02 * sample_rate))
            sig[:, start:start + n] += 0.8 * burst
        sig += 0.01 * rng.standard_normal(sig.shape)
        sig *= 10 ** (dbfs / 20) / np.sqrt(np.mean(sig ** 2))
        out[b] = sig
    return out.astype(np.float32)


def _run_timed(model, feed, repeat: int) -> tuple[np.ndarray, float]:
    """Output and seconds per run: the first run's time when `repeat` is 0, else the best of `repeat` more."""
    sess = _session(model)
    t0 = time.perf_counter()
    out = sess.run(None, feed)[0]
    best = time.perf_counter() - t0
    if repeat:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            sess.run(None, feed)
            best = min(best, time.perf_counter() - t0)
    return out, best


def _build(kind: str, workdir: Path) -> Path:
    """Random-weight model exported to `workdir/<kind>.onnx` (kinds: htdemucs-small, htdemucs-released,
    mel_band_roformer-small, mel_band_roformer-vocals, bs_roformer-small)."""
    out = workdir / f"{kind}.onnx"
    if out.exists():
        return out
    family, size = kind.rsplit("-", 1)
    if family == "htdemucs":
        from .onnx_export import export_demucs
        from .random_demucs import make_htdemucs_checkpoint

        export_demucs(make_htdemucs_checkpoint(workdir / f"{kind}.th", size=size), out)
    else:
        from .random_roformer import make_roformer_checkpoint
        from .roformer_export import export_roformer

        cfg, ckpt = make_roformer_checkpoint(workdir / kind, family, size)
        export_roformer(cfg, ckpt, out, family=family, check_reference=False)
    return out


def main(argv: list[str] | None = None) -> None:
    """Measure fp16 vs fp32: SDR on a music-like chunk, node counts, CPU time. See `--help`."""
    ap = argparse.ArgumentParser(prog="python -m ripper_export.fp16", description=main.__doc__)
    ap.add_argument("models", nargs="*", default=["htdemucs-small", "mel_band_roformer-small"],
                    help="random models (htdemucs-small|released, mel_band_roformer-small|vocals, bs_roformer-small)"
                         " or paths of exported .onnx graphs")
    ap.add_argument("--workdir", default=None, help="where random models are built and cached (default: a temp dir)")
    ap.add_argument("--naive", action="store_true", help="also measure a whole-graph conversion")
    ap.add_argument("--noise", action="store_true", help="also measure on white noise")
    ap.add_argument("--repeat", type=int, default=2,
                    help="CPU timing: best of this many runs after the first (0: the first run's time)")
    ap.add_argument("--save", action="store_true", help="write <model>.fp16.onnx beside each model")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ripper-fp16-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for spec in args.models:
        path = Path(spec) if spec.endswith(".onnx") else _build(spec, workdir)
        m32 = onnx.load(str(path))
        meta = {p.key: p.value for p in m32.metadata_props}
        chans, chunk = int(meta.get("ripper.channels", 2)), int(meta["ripper.chunk_samples"])
        mix = music_like(1, chans, chunk, seed=1)
        t0 = time.perf_counter()
        m16 = to_fp16(m32)
        conv_s = time.perf_counter() - t0
        if args.save:
            onnx.save(m16, str(path.with_suffix(".fp16.onnx")))
        s = precision_summary(m16)
        n16, n32 = sum(s["fp16"].values()), sum(s["fp32"].values())
        heavy16 = sum(v for k, v in s["fp16"].items() if k in COMPUTE_OPS)
        heavy32 = sum(v for k, v in s["fp32"].items() if k in COMPUTE_OPS)
        print(f"== {spec} ({meta.get('ripper.family')}, chunk {chunk}; converted in {conv_s:.1f} s)")
        print(f"   nodes fp16 {n16}, fp32 {n32}; Conv/MatMul/Gemm fp16 {heavy16}, fp32 {heavy32}")
        print(f"   fp32 ops: {s['fp32']}", flush=True)
        feed = {"mix": mix}
        ref, t32 = _run_timed(m32, feed, args.repeat)
        est, t16 = _run_timed(m16, feed, args.repeat)
        print(f"   SDR fp16 vs fp32, music-like -20 dBFS: {sdr_db(ref, est):.1f} dB")
        print(f"   CPU ({os.cpu_count()} cores, not the fp16 target) s/chunk: fp32 {t32:.2f}, fp16 {t16:.2f}",
              flush=True)
        if args.noise:
            noise = (0.1 * np.random.default_rng(2).standard_normal((1, chans, chunk))).astype(np.float32)
            print(f"   SDR fp16 vs fp32, white noise -20 dBFS: {fp16_sdr(m32, m16, noise):.1f} dB")
        if args.naive:
            naive = _session(to_fp16(m32, naive=True)).run(None, feed)[0]
            print(f"   naive whole-graph conversion: {sdr_db(ref, naive):.1f} dB", flush=True)


if __name__ == "__main__":
    main()
