"""Run train.py with a fault injected at a chosen moment of its training loop (used by test_train_faults.py).

    python tests/inject_faults.py --fault-during backward --fault-call 5 --fault-signal KILL -- --online-synthesis ...

On the `--fault-call`-th call of `--fault-during` (`backward`: `torch.Tensor.backward`; `checkpoint`: train.py's
`save_checkpoint`, the atomic write of a checkpoint), one loader worker of the trainer gets `--fault-signal` (KILL,
STOP) and the trainer lingers inside that call for a second, so that the worker's death reaches the trainer there,
where a real training loop would be. `SELF-KILL` kills the trainer itself after that call instead (a crash right
after a checkpoint, for resume tests).
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--fault-during", choices=["backward", "checkpoint"], required=True)
    parser.add_argument("--fault-call", type=int, required=True)
    parser.add_argument("--fault-signal", choices=["KILL", "STOP", "SELF-KILL"], required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    from streamsynth import train

    owner, name = (torch.Tensor, "backward") if args.fault_during == "backward" else (train, "save_checkpoint")
    original, calls = getattr(owner, name), [0]

    def with_fault(*call_args, **call_kwargs):
        calls[0] += 1
        if calls[0] == args.fault_call and args.fault_signal != "SELF-KILL":
            workers = multiprocessing.active_children()
            assert workers, "no loader worker to inject a fault into"
            os.kill(workers[0].pid, getattr(signal, f"SIG{args.fault_signal}"))
            print(f"injected SIG{args.fault_signal} into worker {workers[0].pid} during {args.fault_during} call {calls[0]}",
                  file=sys.stderr, flush=True)
            time.sleep(1.0)  # the worker's death (SIGCHLD) arrives while the trainer is in this call
        result = original(*call_args, **call_kwargs)
        if calls[0] == args.fault_call and args.fault_signal == "SELF-KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, with_fault)
    train.main([a for a in args.train_args if a != "--"])


if __name__ == "__main__":
    main()
