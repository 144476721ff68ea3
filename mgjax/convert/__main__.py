"""`python -m mgjax.convert SRC DST [--t5 DIR] [--overwrite]`."""
from __future__ import annotations

import argparse
import sys


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

    from mgjax.checkpoint import CheckpointError
    from mgjax.config import ConfigError
    from mgjax.convert import convert_checkpoint
    from mgjax.convert.io import ConversionError
    try:
        path = convert_checkpoint(args.src, args.dst, t5_dir=args.t5_dir, overwrite=args.overwrite)
    except (ConversionError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
