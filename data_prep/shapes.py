"""The synthetic shapes world: coloured shapes with compositional captions, videos of moving shapes,
questions with ten answers, referring expressions with boxes. Seeded and offline. It writes the
ORIGINAL dataset formats under OUT/raw/ and builds the canonical indexes with the real readers:

    OUT/itr/  OUT/vtr_msrvtt/  OUT/vtr_msvd/  OUT/vqa/  OUT/gqa/  OUT/refcoco/

Each task builds alone (the recipes build their own task on first use: `python -m mdpd_vl.tasks.itr`
writes images and captions only). The videos need PyAV (`pip install -e ".[video]"`).

    python data_prep/shapes.py --out $MDPD_DATA/shapes
    python data_prep/shapes.py --out data/shapes_tiny --scale tiny --seed 1 --tasks itr,vqa

Re-running is a no-op unless --force (or another --scale / --seed); tasks already built are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mdpd_vl.data.shapes_world import SCALES, TASK_DIRS, build_shapes
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
    parser.add_argument("--tasks", default=",".join(TASK_DIRS),
                        help=f"comma-separated tasks to build (default: all of {','.join(TASK_DIRS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    build_shapes(args.out, args.scale, args.seed, force=args.force, tasks=tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
