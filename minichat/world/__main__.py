"""`python -m minichat.world export --out DIR`: write ChatWorld data as JSONL.

    python -m minichat.world export --out data/world            # the pipeline's world and sizes
    python -m minichat.world export --out examples/data --small # the tiny checked-in samples
    python -m minichat.world sample --family correction -n 2    # print a few dialogues
"""

from __future__ import annotations

import argparse
import json
import sys

from minichat.config import K_RANGE, WorldConfig

from .dialogues import FAMILIES, generate_dialogues
from .export import SMALL, export
from .kb import world_from_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minichat.world", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write every data format into --out")
    ex.add_argument("--out", required=True)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--n-docs", type=int, default=WorldConfig.n_docs)
    ex.add_argument("--n-dialogues", type=int, default=WorldConfig.n_dialogues, help="SFT train dialogues")
    ex.add_argument("--n-heldout", type=int, default=1100, help="SFT held-out dialogues")
    ex.add_argument("--n-prompts", type=int, default=2200, help="PPO train prompts")
    ex.add_argument("--n-comparisons", type=int, default=2200, help="K-way reward rows")
    ex.add_argument("--k", type=int, default=4, help="completions per reward row")
    ex.add_argument("--label-noise", type=float, default=0.1)
    ex.add_argument("--length-bias", type=float, default=0.0)
    ex.add_argument("--small", action="store_true", help="tiny sample files (examples/data)")
    sm = sub.add_parser("sample", help="print a few dialogues")
    sm.add_argument("--family", choices=FAMILIES)
    sm.add_argument("--split", default="train", choices=["train", "heldout"])
    sm.add_argument("-n", type=int, default=3)
    sm.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.cmd == "sample":
        world = world_from_config(WorldConfig(seed=args.seed))
        fams = [args.family] if args.family else None
        for d in generate_dialogues(world, args.n, args.split, args.seed, fams):
            print(json.dumps(d, indent=1, ensure_ascii=False))
        return 0
    sizes = dict(n_docs=args.n_docs, n_dialogues=args.n_dialogues, n_heldout=args.n_heldout,
                 n_prompts=args.n_prompts, n_comparisons=args.n_comparisons)
    if args.small:
        sizes.update(SMALL)
    if not K_RANGE[0] <= args.k <= K_RANGE[1]:
        ap.error(f"--k {args.k}: must be in {K_RANGE[0]}..{K_RANGE[1]} (completions ranked per prompt)")
    try:
        counts = export(args.out, seed=args.seed, k=args.k, label_noise=args.label_noise,
                        length_bias=args.length_bias, **sizes)
    except OSError as e:  # a path that is a file, on a read-only or missing mount, ...
        print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"{args.out}/{name}: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
