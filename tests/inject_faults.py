"""Run train.py with a fault injected at a chosen moment of its training loop (used by test_train_faults.py).

    python tests/inject_faults.py --during backward --call 5 --signal KILL -- --online-synthesis ...

On the `--call`-th call of `--during` (`backward`: `torch.Tensor.backward`; `checkpoint`: `torch.save`), one loader
worker of the trainer gets `--signal` (KILL, STOP) and the trainer lingers inside that call for a second, so that
the worker's death reaches the trainer there, where a real training loop would be. `--signal SELF-KILL` kills the
trainer itself after that call instead (a crash right after a checkpoint, for resume tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--during", choices=["backward", "checkpoint"], required=True)
    parser.add_argument("--call", type=int, required=True)
    parser.add_argument("--signal", choices=["KILL", "STOP", "SELF-KILL"], required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    owner, name = (torch.Tensor, "backward") if args.during == "backward" else (torch, "save")
    original, calls = getattr(owner, name), [0]

    def with_fault(*call_args, **call_kwargs):
        calls[0] += 1
        if calls[0] == args.call and args.signal != "SELF-KILL":
            workers = multiprocessing.active_children()
            assert workers, "no loader worker to inject a fault into"
            os.kill(workers[0].pid, getattr(signal, f"SIG{args.signal}"))
            print(f"injected SIG{args.signal} into worker {workers[0].pid} during {args.during} call {calls[0]}",
                  file=sys.stderr, flush=True)
            time.sleep(1.0)  # the worker's death (SIGCHLD) arrives while the trainer is in this call
        result = original(*call_args, **call_kwargs)
        if calls[0] == args.call and args.signal == "SELF-KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, with_fault)
    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.main([a for a in args.train_args if a != "--"])


if __name__ == "__main__":
    main()
