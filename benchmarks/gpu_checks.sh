#!/usr/bin/env bash
# The GPU checks (the end-to-end path, captioning and synthesis speed), prepared for a lent H100/H200.
#
#   bash benchmarks/gpu_checks.sh e2e OUT          # first: train.py on SD1.5 workers on CUDA, one worker killed; caption on CUDA
#   bash benchmarks/gpu_checks.sh synthesis OUT    # profile SD1.5 eager fast path with ablation, then compiled
#   bash benchmarks/gpu_checks.sh synthesis-extra OUT  # compiled without the kernels; compiled with CUDA graphs
#   bash benchmarks/gpu_checks.sh captioning OUT   # caption-bench BLIP-2 OPT-2.7b: graphed decoding x TF32 Q-Former
#                                                  # x decoding attention, then transformers' static cache
#   bash benchmarks/gpu_checks.sh loop OUT         # loader-bench: SD1.5 workers on the GPU feeding a consumer; the
#                                                  # loader's CPU ceiling on the machine's 16 cores
#   bash benchmarks/gpu_checks.sh levers OUT       # speed levers: SD1.5 images/s per preset and lever against the reference
#   bash benchmarks/gpu_checks.sh families OUT     # each model family's architecture (random weights) at its native
#                                                  # resolution: streamsynth against its diffusers pipeline
#   DRY=1 bash benchmarks/gpu_checks.sh all OUT    # every step on the CPU with tiny models: try the script here first
#   ONLY="loader-bench profile-compiled" bash benchmarks/gpu_checks.sh all OUT  # just the named steps
#
# Measured on an H200 (2026-11-27): e2e 2.7 min (SD1.5 build 20 s, train 92 s, BLIP-2 build 25 s, caption 17 s),
# kernel-bench 40 s, profile-eager 2.7 min, captioning 2.8 min (the JPEGs 14 s); a second session: profile-compiled
# 112 s, synthesis-extra 214 s (no-kernels 113, CUDA graphs 101), loop 123 s + the SD1.5 build (loader-bench 90,
# loader-ceiling 33), speed-levers 78 s, train-e2e 84 s; a third: caption-bench 66-79 s (three runs), caption-bench-static
# 75 s, kernel-bench 58 s (with the exact comparison), profile-compiled 136 s; a fourth: caption-bench 112 s (8 runs on
# 2,048 images), 213 s (4 runs on 8,192, the reference loop 101 s of it), the 8,192 JPEGs 18 s, kernel-bench 46 s.
# A device session of 15 minutes loses 1-2 to the machine's start and about 30 s to each call's transfers.
# A group's limits add up to under 600 s, the device tool's limit for one command. Every step has its own time limit,
# writes its results under OUT/<step>/ (the profiles and benchmarks) as it goes and logs to OUT/<step>.log; a failed
# or timed-out step does not stop the next. OUT/steps.tsv gets one line per step: name, exit status, seconds.
# On the device machine run it from the repository root after the wheel install line (shared/device/README.md).
set -uo pipefail
usage="usage: gpu_checks.sh e2e|synthesis|synthesis-extra|captioning|loop|levers|families|all OUT"
what=${1:?$usage}
OUT=${2:?$usage}
case $what in e2e|synthesis|synthesis-extra|captioning|loop|levers|families|all) ;; *) echo "$usage" >&2; exit 2 ;; esac
mkdir -p "$OUT"
py=${PYTHON:-python3}
cli=("$py" -m streamsynth.cli)
export PYTHONUNBUFFERED=1
# This checkout's streamsynth, also in scripts run by path (tests/inject_faults.py), installed or not.
PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then echo "== $name: skipped (ONLY=$ONLY)"; return 0; fi
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$OUT/steps.tsv"
  tail -n 12 "$OUT/$name.log"
  return "$rc"
}

environment() {
  # GPU, driver, CUDA, CPU and package versions: benchtools' environment capture, as every benchmark's JSON has it.
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$py" -m streamsynth.benchmarks.benchtools --device "$env_device"
  } >"$OUT/environment.txt" 2>&1
  cat "$OUT/environment.txt"
  # Stop at once, before any device time goes to model building, if a wheel is missing.
  "$py" -c "import streamsynth.cli, streamsynth.benchmarks.profile, diffusers, lmdb, webdataset" ||
    { echo "streamsynth cannot be imported: install the wheels first (shared/device/README.md)"; exit 1; }
}

if [[ -n ${DRY:-} ]]; then
  env_device=cpu
  scratch=$OUT/scratch  # model folders, checkpoints and caption stores: too big to come back from the device
  train_e2e=(--device cpu --model resnet18 --image-size 32 --batch-size 4 --steps 8 --num-inference-steps 1
             --synth-batch-size 4 --checkpoint-every 4 --worker-timeout 30 --replay 1)
  kill_at_backward=3
  blip2_e2e=(tiny cpu)
  caption_e2e=(--device cpu --batch-size 8 --workers 1)
  # One kernel's 14 workloads: all 107 take the interpreter a minute more, and tests/test_kernels.py checks every
  # kernel against its reference.
  kernel_bench=(--device cpu --dtype fp32 --warmup 0 --repeats 1 --only guided_step)
  sd15=(--sd-arch tiny --dry --device cpu)
  # No --compile on the CPU: Inductor takes minutes there. tests/test_kernels.py compiles a patched UNet instead.
  profile_compiled=(--no-ablation --channels-last --fuse-qkv)
  compiled_variants=(--no-ablation --channels-last --fuse-qkv)
  compile_flag=()
  jpegs=("$OUT/caption-jpegs" 32)
  captions=(--captioner-arch tiny --device cpu --num-images 32 --batch-size 8,16 --kv-cache dynamic,graphed
            --decode-attention sdpa,triton --workers 1)
  caption_static=(--captioner-arch tiny --device cpu --num-images 32 --batch-size 16 --workers 1)
  loop=(--device cpu --batches 2 --workers 1 --replay 1,2)
  ceiling_batches=2
  levers=(--device cpu --batch-size 2 --repeats 1 --levers reference,fast,deepcache\ 3)
  families=(--size tiny --device cpu --dtype fp32 --batch-size 2 --num-inference-steps 2 --repeats 1)
else
  env_device=cuda
  scratch=/tmp/streamsynth-gpu-checks
  # The acceptance shape of issue 10: SD1.5 workers on the GPU (spawned), pinned memory, bf16 autocast, ResNet-50 at
  # 224, 20 optimizer steps. Few denoising steps: this checks the path, not the speed.
  train_e2e=(--sd-model /tmp/sd15-random --device cuda --synth-devices cuda --amp bf16 --model resnet50
             --image-size 224 --batch-size 32 --steps 20 --num-inference-steps 4 --synth-batch-size 16
             --checkpoint-every 10 --worker-timeout 120 --replay 1)
  kill_at_backward=8
  blip2_e2e=(blip2-opt-2.7b cuda)
  caption_e2e=(--device cuda --dtype fp16 --batch-size 32 --workers 8)
  kernel_bench=(--device cuda --dtype fp16 --batch-size 8)
  sd15=(--sd-arch sd15 --device cuda --dtype fp16 --batch-size 32 --num-inference-steps 50 --guidance-scale 1.5
        --image-size 224 --repeats 2 --model-dir /tmp/sd15-random)
  profile_compiled=(--no-ablation --channels-last --fuse-qkv --compile)
  compiled_variants=(--no-ablation --channels-last --fuse-qkv)
  compile_flag=(--compile)
  jpegs=(/tmp/caption-jpegs-8192 8192)  # not under OUT: everything there is copied back from the device
  # Fourth session, 8,192 images (the steady rate a long job sees): graphed decoding 461 img/s, 514 with a TF32
  # Q-Former; the dynamic cache 430 and 499. Next: the decoding step's attention (two thirds of it in cuDNN's kernel)
  # in streamsynth's kernel for one query token, graphed, with and without TF32.
  captions=(--captioner-arch blip2-opt-2.7b --device cuda --dtype fp16 --num-images 8192 --batch-size 512
            --kv-cache graphed --fp32-matmul ieee,tf32 --decode-attention sdpa,triton --workers 14)
  caption_static=(--captioner-arch blip2-opt-2.7b --device cuda --dtype fp16 --num-images 2048 --batch-size 512
                  --workers 12)
  ceiling_batches=48
  loop=(--sd-model /tmp/sd15-random --device cuda --dtype fp16 --batch-size 16 --num-inference-steps 20 --image-size 224
        --batches 3 --workers 1 --replay 1,4,8 --consumer resnet50)
  levers=(--sd-arch sd15 --model-dir /tmp/sd15-random --device cuda --dtype fp16 --batch-size 16 --image-size 512
          --repeats 2)
  # Not yet run on a GPU. Estimated from the parameter counts: 30-60 s a family (built on the GPU in 10-30 s, the
  # T5-XXL and Gemma 2 encoders the largest; a 2-3 B denoiser takes 1-2 s an image at 1024²). bf16: T5 and Gemma
  # overflow in fp16 (their checkpoints ship in bf16), and so may their random weights.
  families=(--size native --device cuda --dtype bf16 --batch-size 2 --num-inference-steps 20 --guidance-scale 4.5
            --repeats 2)
fi

environment
mkdir -p "$scratch"
case $what in e2e|all)
  # The whole path on the device, first: a crash here is the first bug to fix. The trainer's loop kills one
  # synthesis worker (SIGKILL) inside backward(); the run must finish with every sample id seen exactly once.
  [[ -n ${DRY:-} ]] || step sd15-build 150 "$py" -c \
    "import sys; from streamsynth.synth.sd15 import save_random_sd15 as s; s(sys.argv[1], 'cuda')" /tmp/sd15-random
  rm -rf "$scratch/train-e2e"
  step train-e2e 240 "$py" tests/inject_faults.py --fault-during backward --fault-call $kill_at_backward --fault-signal KILL -- \
    --online-synthesis "${train_e2e[@]}" --workers 2 --log-sample-ids --out "$scratch/train-e2e"
  mkdir -p "$OUT/train-e2e" && cp "$scratch"/train-e2e/*.csv "$OUT/train-e2e/" 2>/dev/null
  step train-e2e-ids 30 "$py" -c "
import collections, sys
ids = [i for line in open(sys.argv[1]) for i in line.strip().split(',')[3].split()]
repeated = [i for i, n in collections.Counter(ids).items() if n > 1]
print(f'{len(ids)} sample ids logged, {len(set(ids))} distinct, repeated: {repeated[:10]}')
sys.exit(1 if repeated or not ids else 0)" "$scratch/train-e2e/sample_ids-rank0.csv"
  # BLIP-2's architecture with random weights, saved and loaded back through from_pretrained by streamsynth caption.
  step caption-e2e-build 180 "$py" -c "
import sys, json, torch
from streamsynth.captions.architectures import save_random_blip2
from streamsynth.benchmarks.caption_bench import write_sample_jpegs
save_random_blip2(sys.argv[1], sys.argv[3] + '/blip2-random', sys.argv[2], torch.float16 if sys.argv[2] == 'cuda' else torch.float32)
write_sample_jpegs(sys.argv[3] + '/caption-e2e-jpegs', 64, num_classes=4)
json.dump({f'class{c:03d}': n for c, n in enumerate(['tench', 'church', 'golf ball', 'parachute'])},
          open(sys.argv[3] + '/caption-e2e-names.json', 'w'))" "${blip2_e2e[@]}" "$scratch"
  rm -rf "$scratch/captions-e2e.lmdb"
  step caption-e2e 150 "${cli[@]}" caption --captioner "$scratch/blip2-random" --images "$scratch/caption-e2e-jpegs" \
    --names "$scratch/caption-e2e-names.json" --out "$scratch/captions-e2e.lmdb" --no-progress "${caption_e2e[@]}"
esac
case $what in synthesis|all)
  # First, in about a minute: each kernel's output and time against its reference, call by call, at SD1.5's shapes.
  step kernel-bench 120 "$py" -m streamsynth.benchmarks.kernel_bench "${kernel_bench[@]}" --out "$OUT/kernel-bench"
  # The acceptance run: streamsynth's default fast path (Triton kernels, fused step and post-processing, probed
  # attention) against plain diffusers, and each kernel switched off alone. Builds /tmp/sd15-random first.
  step profile-eager 270 "${cli[@]}" profile "${sd15[@]}" --out "$OUT/profile-eager"
  # The same plus channels_last, fused QKV and torch.compile of the UNet (anchors: compiling took about 65 s).
  step profile-compiled 240 "${cli[@]}" profile "${sd15[@]}" "${profile_compiled[@]}" --out "$OUT/profile-compiled"
esac
case $what in synthesis-extra|all)
  # Does Inductor alone beat Inductor around the kernels (which it cannot fuse into)? And what do CUDA graphs add?
  step profile-compiled-no-kernels 300 "${cli[@]}" profile "${sd15[@]}" "${compiled_variants[@]}" \
    ${compile_flag[@]+"${compile_flag[@]}"} --no-kernels --out "$OUT/profile-compiled-no-kernels"
  step profile-cuda-graphs 360 "${cli[@]}" profile "${sd15[@]}" "${compiled_variants[@]}" --cuda-graphs \
    --out "$OUT/profile-cuda-graphs"
esac
case $what in captioning|all)
  # The same 500x375 JPEGs for both runs, written once by every core (about 18 ms an image on one).
  if [[ ! -d ${jpegs[0]} ]]; then  # written aside and renamed, so a killed write is never taken for a full set
    rm -rf "${jpegs[0]}.partial"
    step caption-jpegs 90 "$py" -c \
      "import sys; from streamsynth.benchmarks.caption_bench import write_sample_jpegs as w; w(sys.argv[1], int(sys.argv[2]))" \
      "${jpegs[0]}.partial" "${jpegs[1]}" && { [[ ! -d ${jpegs[0]}.partial ]] || mv "${jpegs[0]}.partial" "${jpegs[0]}"; }
  fi
  step caption-bench 300 "${cli[@]}" caption-bench "${captions[@]}" --images "${jpegs[0]}" \
    --out "$OUT/caption-bench"
  # A static KV cache makes transformers compile the decoding step on CUDA: one batch size, since each compiles.
  step caption-bench-static 200 "${cli[@]}" caption-bench "${caption_static[@]}" --images "${jpegs[0]}" \
    --kv-cache static --out "$OUT/caption-bench-static"
esac
case $what in loop|all)
  [[ -n ${DRY:-} || -f /tmp/sd15-random/model_index.json ]] ||
    "$py" -c "from streamsynth.synth.sd15 import save_random_sd15; save_random_sd15('/tmp/sd15-random', 'cuda')"
  step loader-bench 200 "${cli[@]}" loader-bench "${loop[@]}" --out "$OUT/loader-bench"
  # The loader's own ceiling (the acceptance run of the loader-ceiling issue) on the device machine's 16 cores: the
  # embedded model at 1 step on the CPU, so the figure is the hand-over's, not the GPU's. On 2 cores it is bound near 5x.
  step loader-ceiling 150 "${cli[@]}" loader-bench --device cpu --num-inference-steps 1 --guidance-scale 1 \
    --image-size 224 --batch-size 32 --workers 1 --replay 1,8 --consumer none --augment batched,per-image \
    --batches "$ceiling_batches" --out "$OUT/loader-ceiling"
esac
case $what in levers|all)
  # Each speed preset and lever of streamsynth.synth.speed against the reference recipe, round-robin in one run.
  step speed-levers 300 "$py" benchmarks/speed_levers.py "${levers[@]}" --out "$OUT/speed-levers"
esac
case $what in families|all)
  # Each family of streamsynth.synth.families with random weights in its released architecture (its `native`
  # build) at its native resolution: seconds per image of streamsynth's loop and of the family's diffusers pipeline
  # on the same components, alternating, then streamsynth's fast path; the two plain paths' images compared. One
  # JSON record per family as it finishes.
  step family-bench 540 "$py" benchmarks/families.py "${families[@]}" --out "$OUT/family-bench"
esac
echo "== done: $OUT/steps.tsv"
cat "$OUT/steps.tsv" 2>/dev/null || echo "(no step ran)"
