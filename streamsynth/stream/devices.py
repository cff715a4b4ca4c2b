"""Which devices a rank's synthesis workers use."""

from __future__ import annotations

import torch


def synthesis_devices(spec: str | None, trainer_device: str, local_rank: int = 0, local_world_size: int = 1) -> list[str]:
    """Resolve `--synth-devices` for one rank.

    - None: the trainer's own device (synthesis and training share it);
    - "auto": every local GPU that no rank trains on, split among the local ranks; the trainer's device when there
      is none to spare (one GPU, or the CPU);
    - "cuda:1,cuda:2,...": that list, split among the local ranks (rank i takes every local_world_size-th device)
      when it has at least one device per rank, shared by all ranks otherwise.
    """
    if spec is None:
        return [trainer_device]
    if spec == "auto":
        count = torch.cuda.device_count()
        spare = [f"cuda:{i}" for i in range(local_world_size, count)] if trainer_device.startswith("cuda") else []
        devices = spare or [trainer_device]
    else:
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        if not devices:
            raise ValueError(f"--synth-devices {spec!r} names no device")
        for device in devices:
            torch.device(device)  # raises a clear error for a malformed name
    if len(devices) >= local_world_size > 1:
        return devices[local_rank::local_world_size]
    return devices
