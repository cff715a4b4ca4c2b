"""A CUDA stand-in for the drop-in test, active in every process of a run (spawned ones too) when the environment has
STREAMSYNTH_FAKE_CUDA=<number of GPUs>: the training script takes its GPU branches on a CPU machine.

What it keeps of CUDA is what a data loader meets: `torch.cuda.is_available()` and the device count say GPUs exist;
moving a model or tensor to a GPU, or choosing a device, initialises "CUDA" in that process; a process forked from
one that initialised it is in CUDA's bad-fork state (`torch.cuda._is_in_bad_fork()`), where real CUDA fails, and a
spawned one is not. Tensors stay on the CPU. streamsynth's generator is loaded on the CPU in place of the GPU its
worker chose, and each group a worker makes is logged (pid, the chosen device, the sample ids) to
$STREAMSYNTH_FAKE_CUDA_LOG, so the test can see which device every worker of every rank would use.
Python imports `sitecustomize` at start-up from a folder on PYTHONPATH; the test puts this folder there.
"""

import os

if os.environ.get("STREAMSYNTH_FAKE_CUDA"):
    import functools

    import torch
    import torch.distributed
    import torch.nn as nn

    GPUS = int(os.environ["STREAMSYNTH_FAKE_CUDA"])
    _state = {"initialised_in": None, "device": 0}

    def _initialise() -> None:
        if _state["initialised_in"] is None:
            _state["initialised_in"] = os.getpid()

    def _set_device(device) -> None:
        _initialise()
        _state["device"] = device.index if isinstance(device, torch.device) else int(str(device).split(":")[-1])

    def _is_cuda(device) -> bool:
        return (isinstance(device, torch.device) and device.type == "cuda") or \
            (isinstance(device, str) and device.startswith("cuda"))

    def _to_cpu_args(args, kwargs):
        """The same arguments with a CUDA device replaced by the CPU; None when they name no CUDA device (the call
        then goes through untouched)."""
        if not (any(_is_cuda(a) for a in args) or _is_cuda(kwargs.get("device"))):
            return None
        _initialise()
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return args, kwargs

    _real = {(module, name): getattr(module, name)
             for module, names in ((torch.cuda, ("is_available", "device_count", "is_initialized", "current_device",
                                                 "set_device")),
                                   (torch.accelerator, ("is_available", "device_count", "current_accelerator",
                                                        "set_device_index", "current_device_index")))
             for name in names}
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: GPUS
    torch.cuda.is_initialized = lambda: _state["initialised_in"] == os.getpid()
    torch.cuda._is_in_bad_fork = lambda: _state["initialised_in"] not in (None, os.getpid())
    torch.cuda.current_device = lambda: _state["device"]
    torch.cuda.set_device = _set_device
    torch.accelerator.is_available = lambda: True
    torch.accelerator.device_count = lambda: GPUS
    torch.accelerator.current_accelerator = lambda check_available=False: torch.device("cuda")
    torch.accelerator.set_device_index = _set_device
    torch.accelerator.current_device_index = lambda: _state["device"]

    _module_to, _tensor_to, _load = nn.Module.to, torch.Tensor.to, torch.load

    def module_to(self, *args, **kwargs):
        args, kwargs = _to_cpu_args(args, kwargs) or (args, kwargs)
        return _module_to(self, *args, **kwargs)

    def module_cuda(self, device=None):
        _initialise()
        return self

    def tensor_to(self, *args, **kwargs):
        moved = _to_cpu_args(args, kwargs)
        return _tensor_to(self, *args, **kwargs) if moved is None else _tensor_to(self, *moved[0], **moved[1])

    def tensor_cuda(self, device=None, non_blocking=False, **kwargs):
        _initialise()
        return self

    def load(*args, map_location=None, **kwargs):
        return _load(*args, map_location="cpu" if map_location is not None else None, **kwargs)

    nn.Module.to, nn.Module.cuda = module_to, module_cuda
    torch.Tensor.to, torch.Tensor.cuda = tensor_to, tensor_cuda
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.load = load

    class DataParallel(nn.Module):
        """CUDA's DataParallel scatters over the GPUs; here the one CPU copy runs the whole batch."""

        def __init__(self, module, device_ids=None, output_device=None, dim=0):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    torch.nn.DataParallel = nn.DataParallel = DataParallel
    _ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    @functools.wraps(_ddp_init)
    def ddp_init(self, module, device_ids=None, output_device=None, *args, **kwargs):
        _ddp_init(self, module, None, None, *args, **kwargs)  # a CPU module takes no device ids

    torch.nn.parallel.DistributedDataParallel.__init__ = ddp_init

    from streamsynth.stream import groups
    from streamsynth.synth import sampler

    _from_config = sampler.Synthesizer.from_config.__func__
    _make_group = groups.GroupMaker.make_group

    def from_config(cls, config, device):
        """The model, loaded on the CPU in place of the GPU the worker chose (which the log below records), by the
        libraries' own CPU path: transformers and accelerate take other paths when CUDA looks available."""
        faked = {key: getattr(*key) for key in _real}
        for (module, name), function in _real.items():
            setattr(module, name, function)
        try:
            return _from_config(cls, config, "cpu")
        finally:
            for (module, name), function in faked.items():
                setattr(module, name, function)

    def make_group(self, layout, epoch, group, worker=0, class_weights=None, steer=None):
        made = _make_group(self, layout, epoch, group, worker, class_weights, steer)
        with open(os.environ["STREAMSYNTH_FAKE_CUDA_LOG"], "a") as log:
            log.write(f"{os.getpid()} {self.device(worker)} {' '.join(str(s.sample_id) for s in made.specs)}\n")
        return made

    sampler.Synthesizer.from_config = classmethod(from_config)
    groups.GroupMaker.make_group = make_group
