"""What streamsynth measures about itself, each against the plain library loop measured in the same run:
`streamsynth profile` (synthesis, stage by stage), `loader-bench` (the loader feeding a consumer), `caption-bench`
(captioning), `python -m streamsynth.benchmarks.kernel_bench` (each Triton kernel against its reference) and
`python -m streamsynth.benchmarks.kernel_compile_check` (the kernels compiled for a GPU on a machine without one);
`benchtools` is their one toolkit (timing, peak memory, the environment, reports, plots)."""
