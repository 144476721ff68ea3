"""`python -m mgjax.convert SRC DST [--t5 DIR] [--overwrite]`."""
from __future__ import annotations

import argparse
import signal
import sys

import mgjax.convert
from mgjax.checkpoint import CheckpointError
from mgjax.config import ConfigError
from mgjax.convert.io import ConversionError


def exit_on_signal(number: int, _frame) -> None:
    """A signal handler that raises SystemExit(128 + signal), so `finally` blocks and cleanups run."""
    raise SystemExit(128 + number)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgjax.convert",
                                     description="Convert a transformers or audiocraft MusicGen/EnCodec checkpoint "
                                                 "directory into an mgjax checkpoint.")
    parser.add_argument("src", help="source directory (transformers save_pretrained output, or audiocraft "
                                    "state_dict.bin + compression_state_dict.bin)")
    parser.add_argument("dst", help="output directory for the mgjax checkpoint")
    parser.add_argument("--t5", dest="t5_dir", default=None,
                        help="transformers T5 directory (audiocraft checkpoints do not hold the T5 weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    # Unwind (removing the half-written output) instead of dying; the previous handlers come back at the end.
    previous = {number: signal.signal(number, exit_on_signal) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return convert(args)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def convert(args: argparse.Namespace) -> int:
    """Runs the conversion `args` ask for -> exit status (2 with a one-line error for a bad source or target)."""
    try:
        path = mgjax.convert.convert_checkpoint(args.src, args.dst, t5_dir=args.t5_dir, overwrite=args.overwrite)
    except (ConversionError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
