"""Which MatMuls of an exported fp32 graph (either family) `--precision bf16` feeds with bf16 inputs on the CPU.

Measured on this repository's random-weight models (SDR against the fp32 graph on a music-like chunk, OpenVINO
2026.4 on a 2-core AVX512_BF16 EPYC; docs/BENCHMARKS.md "bf16 on the CPU"):

- OpenVINO's own bf16 mode (INFERENCE_PRECISION_HINT=bf16) runs every op between the first and last convolution or
  matmul in bf16, norms and reductions included: 33 dB (small htdemucs), 36.5-37 dB (released size). Marking the
  sensitive nodes (rt_info `precise_0`, or `DisablePrecisionConversion` through an IR) does not keep its MVN/Reduce/
  Eltwise nodes in f32, so that mode cannot be made accurate.
- Converts inserted by us, fp32 hint: only the chosen ops get bf16 inputs (fp32 accumulation and output), the rest
  of the graph (STFT/ISTFT, norms, reductions, softmax, activations) stays f32. Every Conv and MatMul so: 38 dB
  (small htdemucs), 36.5 dB (released); the convolutions are the sensitive part (outermost encoder/decoder layers:
  47-50 dB each alone) and bf16 convolutions gain little on AVX512_BF16 without AMX. MatMuls only: 69.7 / 63.2 dB.
- RoFormers: the band-split input MLPs and the mask-estimator MLPs cost the most (47-52 dB each alone); without them
  the transformer MatMuls give 52.9 dB (Mel-Band, small) and 49.3 dB (BS, small); with them 41-42.6 dB.

So: MatMul nodes outside `fp32_nodes` (the fp16 rules: prologue/epilogue, STFT/ISTFT, norm scopes) and
outside the RoFormer scopes below. The selection is stored in the graph (`ripper.bf16_matmuls`, their output
tensor names) and applied by the OpenVINO runner when it compiles the graph.
"""
from __future__ import annotations

import onnx

from .fp16 import FAMILIES, _name_nodes, fp32_nodes

#: Ops given bf16 inputs (attention and feed-forward projections; torch exports Linear as MatMul + Add).
BF16_OPS = frozenset({"MatMul"})
#: Scopes whose MatMuls stay fp32: RoFormer's band-split and mask-estimator MLPs (see the module docstring).
BF16_FP32_SCOPES = ("/band_split/", "/mask_estimators")


def bf16_matmuls(model: onnx.ModelProto) -> list[str]:
    """Output tensor names of the MatMul nodes to run with bf16 inputs (the graph itself is not changed)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("ripper.family") not in FAMILIES:
        raise ValueError(f"ripper.family {meta.get('ripper.family')!r} is not one of {FAMILIES}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m)
    blocked = fp32_nodes(m)
    return [n.output[0] for n in m.graph.node
            if n.op_type in BF16_OPS and n.name not in blocked and not any(s in n.name for s in BF16_FP32_SCOPES)]
