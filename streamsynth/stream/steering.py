"""Steering: the learner tells the generator what to make next, and a sample stays a pure function of (run seed,
sample id, the state saved with the loader).

Three modes, each given to `StreamLoader`:

- class level, `feedback=ClassFeedback(...)` (`feedback.py`): class weights from the per-class training loss, decided
  at each epoch's start;
- caption level, `steering=CaptionFeedback(...)` (here): captions weighted by the training loss of the images made
  from them (a caption is a handle that a stored data set does not have);
- sample level, `steering=UncertaintySelection(...)` (`selection.py`): each sample chosen from a pool of candidates
  by the learner's uncertainty, under the learner's weights handed to the workers.

The learner's state reaches the workers as numbered versions (`SteeringSchedule`): version k is taken when the
trainer begins group k·every (after it trained on groups 0 .. k·every − 1), and groups k·every + lag ..
(k+1)·every + lag − 1 (group indices count across epochs) are made under it. Groups before `every + lag` are made under
version 0, which is the plain stream. Which version a group is made under is therefore a function of the group's index
alone, never of timing, so a group is a pure function of (seed, group, its version), and the versions that groups
still need are saved with the loader (`state_dict`): resume is exact, on any number of workers. `lag` is how many
groups the workers may make ahead of the trainer without waiting for a version (at least workers x prefetch for no
wait at all); a larger lag steers with an older learner. The trainer never waits for a worker: versions reach the
workers through a `HandOver`.

`prefer="easy"` steers the other way, towards what the learner already knows: a negative control, which a
measurement of steering must see do worse (benchmarks/steering_digits.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .feedback import check_floor, check_prefer, floor_mixed, summed_over_ranks
from .handover import HandOver
from .layout import StreamLayout
from .sampling import CaptionSampler


@dataclass(frozen=True)
class SteeringSchedule:
    """Which version of the learner's state each group is made under; see the module docstring."""

    every: int  # groups between versions
    lag: int = 0  # groups between taking a version and the first group made under it

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"steering needs at least one group between versions, got every={self.every}")
        if self.lag < 0:
            raise ValueError(f"the steering lag is a number of groups, at least 0, got {self.lag}")

    def version(self, group_index: int) -> int:
        """The version group `group_index` is made under (0: no steering yet)."""
        return max(0, (group_index - self.lag) // self.every)

    def due(self, group_index: int) -> int:
        """The newest version taken by the time the trainer begins group `group_index`."""
        return group_index // self.every


class Steering:
    """What every steering mode shares: versions of the learner's state, taken by the trainer when it begins a group
    (`begin_group`, called by `StreamLoader`), handed to the workers, and saved with the loader.

    A mode says what a version holds (`snapshot`, in the trainer's process) and how a group is made under it
    (`steer`, in a worker: a callable that `GroupMaker.make_group` calls in place of its plain loop).
    """

    mode = ""

    def __init__(self, every: int, lag: int, prefer: str):
        check_prefer(prefer)
        self.schedule = SteeringSchedule(every, lag)
        self.prefer = prefer
        self._handover: HandOver | None = None
        self._versions: dict[int, Any] = {}  # the trainer's: versions taken that groups still need
        self._taken = 0  # the newest version taken
        self._in_hand: tuple[int, Callable] | None = None  # a worker's: the version it steers with now
        self._hand_over_s: list[float] = []  # the trainer's time per version taken: the snapshot and its queueing

    def settings(self) -> dict:
        """What the samples depend on besides the learner: a resumed loader must have the same."""
        return {"mode": self.mode, "every": self.schedule.every, "lag": self.schedule.lag, "prefer": self.prefer}

    # ----- the trainer's side ---------------------------------------------------------------------------------------

    def watch(self, model: torch.nn.Module) -> None:
        """The learner (unwrapped from DDP), before the loader's first batch; modes that do not read its weights
        ignore it."""

    def update(self, losses: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """Per-sample training losses (unreduced cross-entropy) of one delivered batch; modes that do not learn from
        the losses ignore them."""

    def snapshot(self) -> Any:
        """The next version's payload: tensors the trainer will not change afterwards."""
        raise NotImplementedError

    def begin_group(self, index: int, layout: StreamLayout, sampler: CaptionSampler) -> None:
        """Before the trainer's first batch of group `index`: take and hand over every version that is due, and let
        go of those no group from here on needs."""
        if self._handover is None:
            self._handover = HandOver()
        while self._taken < self.schedule.due(index):
            started = time.perf_counter()
            self._taken += 1
            self._versions[self._taken] = self.snapshot()
            self._handover.publish(self._taken, self._versions[self._taken])
            self._hand_over_s.append(time.perf_counter() - started)
        needed = self.schedule.version(index)
        self._versions = {k: v for k, v in self._versions.items() if k >= needed}
        self._handover.forget_before(needed)

    def hand_over_s(self) -> list[float]:
        """How long each version taken kept the trainer: the snapshot and handing it to the writer thread."""
        return list(self._hand_over_s)

    def close(self) -> None:
        if self._handover is not None:
            self._handover.close()

    # ----- state ----------------------------------------------------------------------------------------------------

    def learner_state(self) -> dict:
        """The mode's own trainer-side state (e.g. running losses); tensors only, never changed in place later."""
        return {}

    def load_learner_state(self, state: dict) -> None:
        pass

    def state_dict(self, index: int) -> dict:
        """The state a loader about to begin group `index` saves: the versions that groups from there on need."""
        needed = self.schedule.version(index)
        return {"settings": self.settings(), "taken": self._taken,
                "versions": {k: v for k, v in self._versions.items() if k >= needed}, "learner": self.learner_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["settings"] != self.settings():
            raise ValueError(f"cannot resume the stream exactly: steering was {state['settings']}, now "
                             f"{self.settings()}; resume with the saved steering settings, or start afresh")
        self.close()
        self._handover = HandOver()  # a fresh folder: the workers are restarted and read the restored versions
        self._taken, self._versions = state["taken"], dict(state["versions"])
        for version, payload in sorted(self._versions.items()):
            self._handover.publish(version, payload)
        self.load_learner_state(state["learner"])
        self._in_hand = None

    # ----- a worker's side ------------------------------------------------------------------------------------------

    def steer(self, payload: Any, maker, worker: int) -> Callable:
        """How a group is made under a version with this payload (see `GroupMaker.make_group`)."""
        raise NotImplementedError

    def group_steer(self, index: int, maker, worker: int, beat: Callable[[], None] | None = None) -> Callable | None:
        """What group `index` is made with in this worker: None for version 0 (the plain stream), else its
        version's `steer`, read from the hand-over once per version."""
        version = self.schedule.version(index)
        if version == 0:
            return None
        if self._in_hand is None or self._in_hand[0] != version:
            self._in_hand = version, self.steer(self._handover.read(version, beat), maker, worker)
        return self._in_hand[1]

    # What a worker never needs (it reads versions from the hand-over): left out when the object is pickled for one.
    _trainer_only: tuple[str, ...] = ("_versions", "_in_hand", "_hand_over_s")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._trainer_only:
            state[name] = None
        return state


class CaptionFeedback(Steering):
    """Caption-level steering: captions whose images the learner gets wrong are drawn more often.

    A caption's hardness is the mean training loss of the images made from it, over the captions with the same text
    in the same class (one prompt, one handle), shrunk towards its class's mean by `prior` pseudo-observations
    (a caption is seen a few times per run at most), with earlier versions' observations kept at weight `momentum`
    per version. A version's caption weights are

        w_i = floor / N + (1 - floor) * h_i / sum_j h_j        (N captions, h_i the hardness of caption i's handle)

    so a share `floor` of the samples stays spread over all captions. Under DDP the losses are summed over ranks.
    Cost: nothing generated beyond the plain stream; one hash per reported sample and one pass over the caption
    store when the first version is taken.
    """

    mode = "caption"

    def __init__(self, every: int = 8, lag: int = 4, floor: float = 0.5, prior: float = 2.0, momentum: float = 0.9,
                 prefer: str = "hard"):
        super().__init__(every, lag, prefer)
        check_floor(floor, "of the samples")
        if prior <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"CaptionFeedback needs prior > 0 and momentum in [0, 1), got {prior} and {momentum}")
        self.floor, self.prior, self.momentum = floor, prior, momentum
        self._handles: torch.Tensor | None = None  # flat caption index → handle (class, text)
        self._handle_class: torch.Tensor | None = None
        self._loss_sum = self._count = None  # per handle, decayed across versions
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (handles, losses) since the last version
        self._base_sampler: CaptionSampler | None = None
        self._samplers: dict[int, CaptionSampler] = {}  # per version still needed: what its groups were drawn with
        self._global_batch = 0

    _trainer_only = (*Steering._trainer_only, "_handles", "_handle_class", "_loss_sum", "_count", "_pending",
                     "_samplers")

    def settings(self) -> dict:
        return {**super().settings(), "floor": self.floor, "prior": self.prior, "momentum": self.momentum}

    def _index_handles(self, sampler: CaptionSampler) -> None:
        """One pass over the store: which captions share a text within their class."""
        handles, handle_class, seen = [], [], {}
        for label in range(sampler.store.num_classes):
            for caption in sampler.store.captions(label):
                key = (label, caption.text)
                if key not in seen:
                    seen[key] = len(handle_class)
                    handle_class.append(label)
                handles.append(seen[key])
        self._handles, self._handle_class = torch.tensor(handles), torch.tensor(handle_class)
        if self._loss_sum is None:  # else restored by load_state_dict
            self._loss_sum = torch.zeros(len(handle_class), dtype=torch.float64)
            self._count = torch.zeros(len(handle_class), dtype=torch.float64)

    def begin_group(self, index: int, layout: StreamLayout, sampler: CaptionSampler) -> None:
        if self._handles is None:
            self._index_handles(sampler)
        self._global_batch, self._base_sampler = layout.global_batch_size, sampler
        super().begin_group(index, layout, sampler)

    def _sampler_of(self, version: int, sample_id: int) -> CaptionSampler:
        if version not in self._samplers:
            if version and version not in self._versions:
                raise ValueError(f"CaptionFeedback.update: sample {sample_id} was made under steering version "
                                 f"{version}, which no group needs any more: report a batch's losses before drawing "
                                 "the next group's batches")
            self._samplers = {k: s for k, s in self._samplers.items() if k == 0 or k in self._versions}
            self._samplers[version] = self._base_sampler.caption_weighted(
                self._versions[version].numpy() if version else None)
        return self._samplers[version]

    def update(self, losses: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> None:
        # A sample's caption is recomputed from its id and its group's version: the same pure function the worker ran.
        if self._handles is None:
            raise ValueError("CaptionFeedback.update before the loader's first batch: report the losses of batches "
                             "the loader delivered")
        ids = sample_ids.tolist()
        versions = [self.schedule.version(sample_id // self._global_batch) for sample_id in ids]
        # One sampler lookup per version in the batch (a batch is one group, so usually one).
        samplers = {version: self._sampler_of(version, sample_id)
                    for version, sample_id in dict(zip(versions, ids)).items()}
        flats = [samplers[v].flat_index(*samplers[v].locate(sample_id)) for v, sample_id in zip(versions, ids)]
        self._pending.append((self._handles[torch.tensor(flats, dtype=torch.long)], losses.detach().double().cpu()))

    def _pending_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (handle, loss) pairs reported since the last version, as two tensors in the order reported."""
        if not self._pending:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        return torch.cat([h for h, _ in self._pending]), torch.cat([loss for _, loss in self._pending])

    def snapshot(self) -> torch.Tensor:
        handles, losses = self._pending_tensors()
        size = len(self._handle_class)
        new_sum, new_count = summed_over_ranks(torch.zeros(size, dtype=torch.float64).index_add_(0, handles, losses),
                                               torch.bincount(handles, minlength=size).double())
        self._pending = []
        # New tensors, never updated in place: a state_dict taken earlier keeps its values.
        self._loss_sum = self.momentum * self._loss_sum + new_sum
        self._count = self.momentum * self._count + new_count
        classes = self._handle_class
        class_sum = torch.zeros(int(classes.max()) + 1, dtype=torch.float64).index_add_(0, classes, self._loss_sum)
        class_count = torch.zeros_like(class_sum).index_add_(0, classes, self._count)
        overall = self._loss_sum.sum() / self._count.sum().clamp(min=1e-12)
        class_mean = torch.where(class_count > 0, class_sum / class_count.clamp(min=1e-12), overall)
        hardness = ((self._loss_sum + self.prior * class_mean[classes]) / (self._count + self.prior)).clamp(min=1e-8)
        if self.prefer == "easy":
            hardness = 1 / hardness
        return floor_mixed(hardness[self._handles], self.floor).float()

    def learner_state(self) -> dict:
        if self._handles is None:
            return {}
        handles, losses = self._pending_tensors()
        return {"loss_sum": self._loss_sum, "count": self._count, "pending_handles": handles,
                "pending_losses": losses}

    def load_learner_state(self, state: dict) -> None:
        self._samplers = {}
        if not state:
            return
        self._loss_sum, self._count = state["loss_sum"], state["count"]
        self._pending = [(state["pending_handles"], state["pending_losses"])]

    def steer(self, payload: torch.Tensor, maker, worker: int) -> Callable:
        return WeightedCaptions(maker.sampler.caption_weighted(payload.numpy()))


class WeightedCaptions:
    """A worker's way to make a group under one version's caption weights: the group's own sample ids, each drawing
    its caption by weight; nothing more is generated."""

    def __init__(self, sampler: CaptionSampler):
        self.sampler = sampler

    def __call__(self, maker, sample_ids: Sequence[int], worker: int) -> tuple[list, torch.Tensor, int, float]:
        specs = [self.sampler(i) for i in sample_ids]
        return specs, maker.render(specs, worker), len(specs), 0.0
