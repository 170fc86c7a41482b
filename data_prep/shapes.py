"""The synthetic shapes world: coloured shapes with compositional captions, videos of moving shapes,
questions with ten answers, referring expressions with boxes. Seeded and offline. It writes the
ORIGINAL dataset formats under OUT/raw/ and builds the canonical indexes with the real readers:

    OUT/itr/  OUT/vtr_msrvtt/  OUT/vtr_msvd/  OUT/vqa/  OUT/gqa/  OUT/refcoco/

Example (the embedded default of `python -m mdpd_vl.tasks.itr` builds this on demand):

    python data_prep/shapes.py --out $MDPD_DATA/shapes
    python data_prep/shapes.py --out /tmp/shapes_tiny --scale tiny --seed 1

Re-running is a no-op unless --force (or another --scale / --seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mdpd_vl.data.shapes_world import SCALES, build_shapes
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and build the world; exit status 2 on bad input."""
    parser = argparse.ArgumentParser(prog="data_prep/shapes.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for raw/ and the task indexes")
    parser.add_argument("--scale", choices=sorted(SCALES), default="default",
                        help="tiny (tests, seconds) or default (the demo, well under a minute)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> identical files")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    build_shapes(args.out, args.scale, args.seed, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
