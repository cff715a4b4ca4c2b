"""Run `streamsynth ARGS` as one rank of a torchrun job, and kill -9 one rank in the middle (used by test_scale.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/kill_rank.py --rank 1 --commit 2 -- \
        caption --images ... --out ...

Rank `--rank` sends itself SIGKILL right after its `--commit`-th caption store commit (the writer's first one
included). torchrun then stops the other ranks, as it does when any rank dies.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--commit", type=int, required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if int(os.environ["RANK"]) == args.rank:
        from streamsynth.captions.store import CaptionStoreWriter

        original, calls = CaptionStoreWriter.commit, [0]

        def commit_then_die(*call_args, **call_kwargs):
            result = original(*call_args, **call_kwargs)
            calls[0] += 1
            if calls[0] == args.commit:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        CaptionStoreWriter.commit = commit_then_die
    from streamsynth.cli import main as cli

    return cli([a for a in args.args if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
