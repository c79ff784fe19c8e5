"""`ripper-dist` command line: `models`, `export`, `doctor`, `separate`, `evaluate`, `report`.

Flags follow `demucs` (`-n/--name`, `--repo`, `--shifts`, `--overlap`, `--segment`, `--two-stems`, `--other-method`,
`--int24`, `--float32`, `--flac`, `--mp3`, `--mp3-bitrate`, `--filename`, `--clip-mode`, `-d/--device`, `-o/--out`,
`-j/--jobs`) with audio-separator-style long forms (`--model`, `--checkpoint`, `--config`, `--format`, `--subtype`,
`--stems`, `--sample-rate`). Every option is checked before a model is loaded: a mistake is one line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .encoders import FORMATS
from .stem_sink import DEFAULT_TEMPLATE

if TYPE_CHECKING:
    from .options import SeparateOptions


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of chunks or auto")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-n", "--name", "--model", dest="model", default="htdemucs",
                   help="a model of the catalogue (`ripper-dist models`: htdemucs, htdemucs_ft, htdemucs_6s and "
                        "RoFormers such as mel_band_roformer_kim_vocals, model_bs_roformer_ep_317_sdr_12.9755), a "
                        "bag/signature in --repo, or mel_band_roformer / bs_roformer with --config and --checkpoint "
                        "(default: htdemucs); "
                        "several, comma-separated, for an ensemble (--ensemble)")
    g.add_argument("--onnx", type=Path, metavar="FILE.onnx",
                   help="an exported graph (from `ripper-dist export -o DIR`): separates without the checkpoint or "
                        "torch; its metadata carries the stems, rate and configuration")
    g.add_argument("--repo", type=Path, help="local Demucs repo: NAME.yaml bags and <sig>[-<sha8>].th files")
    g.add_argument("--checkpoint", type=Path, help="a single checkpoint: Demucs .th, or a RoFormer .ckpt/.pth")
    g.add_argument("--config", type=Path, help="RoFormer YAML config shipped with the checkpoint")
    g.add_argument("--segment", type=float, help="Demucs split length in seconds (at most the model's segment)")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="fp16: graphs with convolutions, attention and feed-forward layers in half precision (for "
                        "GPUs; the STFT, norms and reductions stay fp32); bf16: attention and feed-forward matmuls "
                        "on the CPU's bf16 units (AVX512_BF16/AMX; OpenVINO, everything else fp32). Both are "
                        "checked against fp32 when first made")
    g.add_argument("--explain", action="store_true",
                   help="explanation graphs: Demucs also writes each stem's time-branch and spectral-branch terms "
                        "(STEM.time, STEM.spec; they sum to STEM), RoFormer each stem's per-band masks "
                        "(STEM.masks.npy, bands x frames); `ripper-dist report` draws them")


def _add_separate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="audio files, folders (recursive), globs, or lists (.txt/.csv/.parquet of paths)")
    p.add_argument("-o", "--out", type=Path, default=Path("separated"), help="output folder (default: ./separated)")
    _add_model_args(p)
    g = p.add_argument_group("separation")
    g.add_argument("--shifts", type=int, default=0,
                   help="random time shifts averaged (upstream's equivariant stabilisation; 0 = deterministic, default)")
    g.add_argument("--seed", type=int, default=0, help="seed for the shifts' offsets")
    g.add_argument("--overlap", type=float, help="overlap between Demucs chunks (default 0.25)")
    g.add_argument("--num-overlap", type=int, help="RoFormer: chunks per chunk length (default from the config)")
    g.add_argument("--tta", action="store_true",
                   help="RoFormer: test-time augmentation as MSST's --use_tta: each chunk also run with its channels "
                        "swapped and its polarity inverted, the three outputs averaged (3x the model runs; Demucs: "
                        "--shifts)")
    g.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="chunks per ONNX Runtime run, or auto (default): 1 on the CPU; on a GPU as many as its free "
                        "memory holds (measured, at most 16), halved if a batch fails to allocate")
    g.add_argument("--stems", help="comma-separated stems to keep (default: all)")
    g.add_argument("--two-stems", metavar="STEM", help="keep STEM and its complement no_STEM (see --other-method)")
    g.add_argument("--other-method", choices=["add", "minus", "none"],
                   help="with --two-stems: no_STEM as the sum of the other sources (add, default), as the mix minus "
                        "STEM (minus), or not written (none); as demucs")
    g.add_argument("--then", action="append", metavar="STEM=MODEL",
                   help="chain: split the STEM this model wrote with MODEL (a Demucs name, or a bag in --then-repo); "
                        "stems land in OUT/<model>.STEM.MODEL/<track>/, e.g. -n mel_band_roformer ... "
                        "--then other=htdemucs")
    g.add_argument("--then-repo", type=Path, help="local Demucs repo for the --then models")
    g.add_argument("--ensemble", default="avg_wave", metavar="ALGO",
                   help="with -n a,b (models with the same stems and rate): avg_wave (default), median_wave, "
                        "min_wave, max_wave, avg_fft, median_fft, min_fft or max_fft")
    g.add_argument("--ensemble-weights", metavar="W1,W2", help="weights of the -n models for avg_wave/avg_fft")
    g = p.add_argument_group("output")
    g.add_argument("--filename", default=DEFAULT_TEMPLATE,
                   help="stem path inside OUT, with {track} (input name), {trackext} (its extension), {stem}, "
                        "{ext} and {model} (default: %(default)s, as demucs)")
    g.add_argument("--format", choices=list(FORMATS), default="wav",
                   help="wav (default), flac, mp3, ogg (Vorbis), opus (48 kHz) or m4a (AAC, needs PyAV)")
    g.add_argument("--flac", action="store_const", const="flac", dest="format", help="same as --format flac")
    g.add_argument("--mp3", action="store_const", const="mp3", dest="format", help="same as --format mp3")
    g.add_argument("--bitrate", "--mp3-bitrate", type=int, metavar="KBPS", dest="bitrate",
                   help="mp3/m4a bitrate in kbps (default 320)")
    g.add_argument("--sample-rate", type=int, metavar="HZ", help="output sample rate (default: the input's)")
    g.add_argument("--subtype", choices=["PCM_16", "PCM_24", "FLOAT"], help="wav/flac sample format (default PCM_16)")
    g.add_argument("--int24", action="store_const", const="PCM_24", dest="subtype", help="same as --subtype PCM_24")
    g.add_argument("--float32", action="store_const", const="FLOAT", dest="subtype", help="same as --subtype FLOAT")
    g.add_argument("--clip-mode", choices=["rescale", "clamp", "none"], default="rescale",
                   help="avoid clipping: rescale a stem that peaks above 1 (default, as demucs), clamp, or none")
    g = p.add_argument_group("execution")
    g.add_argument("-d", "--device", default="cpu", help="cpu, cuda[:N] or tensorrt[:N] (default cpu)")
    g.add_argument("--backend", choices=["auto", "ort", "openvino"], default="auto",
                   help="CPU runtime for the ONNX graph: ONNX Runtime, OpenVINO (if installed), or auto (default): "
                        "measured once per machine and model, OpenVINO only when >= 10%% faster")
    g.add_argument("-j", "--jobs", type=int, dest="actors", metavar="N",
                   help="parallel workers, as demucs' -j: N ONNX Runtime actors sharing the cores (implies the Ray "
                        "engine; default: one per GPU, or cores / threads)")
    g.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (default: all cores for one)")
    g.add_argument("--engine", choices=["auto", "ray", "local"], default="auto",
                   help="ray (an embedded local Ray, or the cluster at --address), local (one process), or auto "
                        "(default): ray, except for a single track without --address, where Ray's start-up costs "
                        "more than it gains")
    g.add_argument("--address", help="Ray cluster address (e.g. auto inside `ray job submit`, or ray://head:10001)")
    g.add_argument("--actors", type=int, dest="actors", help=argparse.SUPPRESS)  # the older name of -j/--jobs
    g.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray (default: all)")
    g.add_argument("--no-shared-fs", dest="shared_fs", action="store_false",
                   help="the cluster's nodes cannot see INPUT and OUT (no NFS): this node reads the inputs and writes "
                        "the stems; workers get model-rate windows and send back their separated spans over Ray")
    g.add_argument("--track-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="give up on a track (a failed row, the job goes on) after SECONDS plus SECONDS/20 per second "
                        "of audio (default 600: 10 minutes + 30 s per audio second; 0: no limit)")
    g.add_argument("--chunk-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop an ONNX Runtime run that takes longer (its track fails; default 600; 0: no limit)")
    g.add_argument("--force", action="store_true", help="redo tracks already done in OUT")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--evaluate", type=Path, metavar="REF_DIR",
                   help="then score the stems against references (MUSDB18-HQ or <track>/<stem>.wav) into "
                        "OUT/evaluation.parquet (as `ripper-dist evaluate`)")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log what happens, Ray's own logging included (else in OUT/.ripper-dist/ray.log)")


EXAMPLES = """examples:
  ripper-dist separate song.mp3 -o separated                    # separated/htdemucs/song/{drums,bass,other,vocals}.wav
  ripper-dist separate album/ -n htdemucs_ft --two-stems vocals --mp3 --mp3-bitrate 256
  ripper-dist separate list.txt -n htdemucs_6s --flac --int24 --filename "{track}-{stem}.{ext}"
  ripper-dist separate song.wav --repo demo/models -n demo      # a local Demucs repo (NAME.yaml + .th files)
  ripper-dist separate song.wav -n mel_band_roformer --config kj.yaml --checkpoint kj.ckpt
  ripper-dist export -n htdemucs -o graphs/ && ripper-dist separate song.wav --onnx graphs/htdemucs.onnx
  ripper-dist separate album/ -n htdemucs,htdemucs_ft --ensemble avg_wave   # one ensemble row per track
  ripper-dist separate mixes/ --evaluate refs/ -o out           # then score against refs/<track>/<stem>.wav
  ripper-dist report out                                        # out/report/index.html: spectrograms, players, scores
  ripper-dist separate song.wav -n mel_band_roformer_kim_vocals   # a catalogue RoFormer: fetched, verified, exported
  ripper-dist models                                            # models by name (catalogue) and cached exports
  ripper-dist doctor                                            # which devices (CPU, CUDA, TensorRT) start here

metadata.parquet in OUT has one row per (model, input); rerun a command to resume it.
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="ripper-dist", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"ripper-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{models,export,doctor,separate,evaluate,report}")

    p = sub.add_parser("models", help="list the models known by name (-n NAME: family, stems, size, score, licence, "
                                      "downloaded or not) and the cached exports")
    p.add_argument("--json", action="store_true", help="print the catalogue as JSON (for scripts)")

    p = sub.add_parser("export", help="export a model to ONNX (cached; parity-checked against upstream)",
                       epilog="example: ripper-dist export -n htdemucs -o graphs/   # then separate --onnx "
                              "graphs/htdemucs.onnx", formatter_class=fmt)
    _add_model_args(p)
    p.add_argument("-o", "--out", type=Path, help="also copy the graph(s) into this folder as <model>.onnx")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)

    p = sub.add_parser("doctor", help="execution providers that start here (and why not), GPUs seen by NVML and "
                                      "Ray, CPU backends")
    p.add_argument("-d", "--device", help="exit 1 unless this device (cpu, cuda, tensorrt) starts")
    p.add_argument("--address", help="also count the GPUs of this Ray cluster, read its workers' niceness and say "
                                     "whether it wants a token and takes this process's (exit 1 if it cannot be joined)")

    p = sub.add_parser("separate", help="separate tracks into stems", epilog=EXAMPLES, formatter_class=fmt)
    _add_separate_args(p)

    p = sub.add_parser("evaluate", help="score separated stems against reference stems (BSS Eval v4, SDR, SI-SDR, "
                                        "MSST l1_freq, bleedless, fullness)",
                       epilog="examples:\n"
                              "  ripper-dist evaluate stems/ musdb18hq/                      # a separate output\n"
                              "  ripper-dist evaluate separated/ musdb18hq/ -o cmp.parquet   # demucs' "
                              "separated/<model>/<track>/<stem>.wav\n"
                              "  ripper-dist evaluate other/ refs/ --model mine -o cmp.parquet   # "
                              "other/<track>/<stem>.flac",
                       formatter_class=fmt)
    p.add_argument("out", type=Path, metavar="OUT",
                   help="a separate command's output folder (its metadata.parquet), or any folder of stems: "
                        "OUT/<track>/<stem>.<ext> or OUT/<model>/<track>/<stem>.<ext>, tracks named like the "
                        "reference folders")
    p.add_argument("references", type=Path, metavar="REF_DIR",
                   help="MUSDB18-HQ root (train/test/<track>/<stem>.wav) or any <track>/<stem>.wav folder")
    p.add_argument("--engine", choices=["auto", "ray", "local"], default="auto",
                   help="ray: one task per track (the embedded local Ray or --address); auto: ray for several tracks")
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray (default: all)")
    p.add_argument("--force", action="store_true", help="re-evaluate tracks already scored")
    p.add_argument("-o", "--output", type=Path, metavar="FILE_OR_DIR",
                   help="write the table here: a .parquet file, or a folder (gets evaluation.parquet); default "
                        "OUT/evaluation.parquet. Rows of other models already in it are kept")
    p.add_argument("--model", metavar="NAME",
                   help="the model column for OUT/<track>/<stem> (default: OUT's folder name); with model folders "
                        "or metadata.parquet: evaluate that model only")

    p = sub.add_parser("report", help="HTML pages of a job: metadata, spectrograms, players, loudness, scores")
    p.add_argument("out", type=Path, metavar="OUT", help="a separate command's output folder")
    return parser


def _released_by_file() -> dict[str, str]:
    """Checkpoint file name -> catalogue name (names the cached exports)."""
    from .catalog import entries
    return {f.name: e.name for e in entries().values() for f in e.files}


def _downloaded(entry) -> bool:
    from .sources import cache_dir
    folder = cache_dir() / "checkpoints"
    files = entry.files + ([entry.config_file] if entry.config_file else [])
    return all((folder / f.name).exists() for f in files)


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.0f} MB"


def cmd_models(args) -> int:
    """The catalogue (every model `-n NAME` knows: family, stems, size, first published score, licence, downloaded
    or not, and why one cannot be exported yet), then the cached exports by model name with family, stems, size,
    parity and origin. `--json`: the catalogue entries with `downloaded` and `exportable` added, for scripts."""
    import json

    from .catalog import entries
    from .export_cache import onnx_root
    from .onnx_model import read_info
    if getattr(args, "json", False):
        rows = [e.raw | {"downloaded": _downloaded(e), "exportable": not e.problems(), "problems": e.problems()}
                for e in entries().values()]
        print(json.dumps(rows, indent=1))
        return 0
    print("Models by name (-n NAME: downloaded into the cache, verified, exported and parity-checked on first use; "
          "`--json` for all the facts and their sources):")
    width = max(len(n) for n in entries())
    for e in entries().values():
        problems = e.problems()
        note = f"  NOT EXPORTABLE YET: {', '.join(problems)}" if problems else ""
        print(f"  {e.name:<{width}} {e.family:<17} {','.join(e.stems):<36} {_size(e.size):>7}  "
              f"{e.score() or 'no published score':<36} licence: {e.licence}"
              f"{'  [downloaded]' if _downloaded(e) else ''}{note}")
    print("Or bring a RoFormer checkpoint and its YAML config: -n mel_band_roformer|bs_roformer --config C.yaml "
          "--checkpoint M.ckpt")
    root = onnx_root()
    graphs = sorted(root.rglob("*.onnx")) if root.exists() else []
    print(f"Exported graphs cached in {root}: {len(graphs)}")
    released = _released_by_file()
    for g in graphs:
        try:
            info = read_info(g)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is listed, not fatal
            print(f"  {g.relative_to(root)}: unreadable ({type(e).__name__})")
            continue
        meta = info.raw
        ckpt = meta.get("ripper.checkpoint_name", "")
        name = released.get(ckpt) or Path(ckpt).stem or g.parent.name
        origin = f"catalogue {ckpt}" if ckpt in released else f"checkpoint {ckpt}" if ckpt else "unknown checkpoint"
        precision = meta.get("ripper.precision", "fp32")
        parity = meta.get("ripper.parity_sdr_db")
        print(f"  {name:<14} {info.family:<17} {','.join(info.sources):<32} {g.stat().st_size / 1e6:7.1f} MB "
              f"{precision}  {f'parity {float(parity):.1f} dB' if parity else ''}  from {origin}  "
              f"({g.relative_to(root)})")
    return 0


def cmd_export(args) -> int:
    import shutil

    from .models import ModelChoice, export_model
    from .onnx_model import read_info
    exported = export_model(ModelChoice(args.model, args.onnx, args.repo, args.checkpoint, args.config,
                                        args.precision, args.explain))
    bag = len(exported.onnx_paths) > 1
    for k, p in enumerate(exported.onnx_paths):
        meta = read_info(p).raw
        checks = [f"{meta['ripper.parity_sdr_db']} dB from upstream torch"] if "ripper.parity_sdr_db" in meta else []
        if "ripper.fp16_sdr_db" in meta:
            checks.append(f"fp16: {meta['ripper.fp16_sdr_db']} dB from fp32")
        if "ripper.bf16_sdr_db" in meta:
            checks.append(f"bf16: {meta['ripper.bf16_sdr_db']} dB from fp32")
        if "ripper.explain_sum_sdr_db" in meta:
            db = meta["ripper.explain_sum_sdr_db"]
            checks.append("explanation: time + spectral branch " + ("equal to" if db == "inf" else f"{db} dB from")
                          + " the output")
        if "ripper.explain_masks_sdr_db" in meta:
            checks.append(f"explanation: band masks {meta['ripper.explain_masks_sdr_db']} dB from torch")
        print(p, f"({'; '.join(checks)})" if checks else "")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            suffix = {"fp16": "-fp16", "bf16": "-bf16"}.get(meta.get("ripper.precision"), "")
            dest = args.out / f"{exported.name}{f'-{k}' if bag else ''}{suffix}.onnx"
            shutil.copyfile(p, dest)
            print(f"  -> {dest}" + ("" if bag else f"   (ripper-dist separate INPUT --onnx {dest})"))
    if args.out and bag:
        print("a bag: each graph is one of its models; separate the bag with -n/--repo (the cache makes it free)")
    return 0


def separate_options(args) -> "SeparateOptions":
    """The parsed command line as the one options object the runtime takes (validated on construction)."""
    from .options import SeparateOptions, parse_then
    return SeparateOptions(
        inputs=tuple(args.inputs), out=args.out, model=args.model, onnx=args.onnx, repo=args.repo,
        checkpoint=args.checkpoint, config=args.config, precision=args.precision, explain=args.explain,
        shifts=args.shifts, seed=args.seed, overlap=args.overlap, segment=args.segment, num_overlap=args.num_overlap,
        tta=args.tta,
        batch_size=args.batch_size, stems=args.stems, two_stems=args.two_stems, other_method=args.other_method,
        format=args.format, subtype=args.subtype, clip_mode=args.clip_mode, bitrate=args.bitrate,
        sample_rate=args.sample_rate, filename=args.filename, device=args.device, backend=args.backend,
        threads=args.threads, engine=args.engine, address=args.address, actors=args.actors,
        num_cpus=args.num_cpus, shared_fs=args.shared_fs, track_timeout=args.track_timeout,
        chunk_timeout=args.chunk_timeout, force=args.force, progress=not args.no_progress,
        verbose=args.verbose, then=parse_then(args.then), then_repo=args.then_repo, ensemble=args.ensemble,
        ensemble_weights=args.ensemble_weights)


def cmd_doctor(args) -> int:
    from .doctor import report
    return report(args.device, args.address)


def cmd_separate(args) -> int:
    from .separator import run_separation
    opts = separate_options(args)
    if args.evaluate is not None and not args.evaluate.is_dir():
        raise ValueError(f"--evaluate: {args.evaluate} is not a folder")
    rc = run_separation(opts)
    if args.evaluate is not None:
        from .evaluate import EvaluateOptions, run_evaluation
        rc = max(rc, run_evaluation(EvaluateOptions(out=opts.out, references=args.evaluate, engine=opts.engine,
                                                     address=opts.address, num_cpus=opts.num_cpus,
                                                     verbose=opts.verbose))[1])
    return rc


def cmd_report(args) -> int:
    from .report import main as report_main
    return report_main(args.out)


def cmd_evaluate(args) -> int:
    from .evaluate import EvaluateOptions, run_evaluation
    return run_evaluation(EvaluateOptions(out=args.out, references=args.references, engine=args.engine,
                                          address=args.address, num_cpus=args.num_cpus, force=args.force,
                                          verbose=args.verbose, output=args.output, model=args.model))[1]


def main(argv: list[str] | None = None) -> int:
    """Exit status, the same for both engines: 0 every track done, 1 some failed (rows in metadata.parquet, tracebacks
    in OUT/.ripper-dist/errors.log), 2 usage or setup error (one line), 130 interrupted (rerun to resume)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"models": cmd_models, "export": cmd_export, "separate": cmd_separate, "doctor": cmd_doctor,
                "evaluate": cmd_evaluate, "report": cmd_report}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, MemoryError) as e:  # usage or setup: nothing (more) can be done
        if args.verbose:
            raise
        from .error_log import setup_message
        print(f"ripper-dist: error: {setup_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
