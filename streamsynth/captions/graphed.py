"""Greedy captioning with BLIP-2 whose one-token decoding step is replayed from a CUDA graph.

transformers' `generate` launches every kernel of every decoding step from Python: on an H200, OPT-2.7b's 15 tokens
after the first took 18 ms each for 512 captions, about four times their arithmetic. Here the image is encoded and
the prompt prefilled as `generate` does, into a static KV cache; then the step (one token in, the next token out) is
captured once per batch size and replayed, with its inputs in fixed buffers that are updated in place:

    encode (vision tower, Q-Former, projection) -> prefill into the static cache -> first token
    step 1 and 2 eagerly (they warm the step up) -> capture the step -> replay it for the other tokens

The result is `generate`'s with `do_sample=False, num_beams=1`: the prompt ids followed by the new tokens, padding after
a caption's end-of-sequence, stopping once every caption has ended. Used by `Captioner(kv_cache="graphed")` for BLIP-2
with a decoder-only language model whose generation config adds no logits processor (`unsupported_reason`). Off a
CUDA device the same buffers are stepped eagerly, which is how the CPU tests check it against `generate`.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)

# Generation-config fields that make transformers add a logits processor to greedy decoding, and their neutral values.
_NEUTRAL = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False,
}
_EAGER_STEPS = 2  # steps run before the capture: CUDA's lazy initialisations happen outside the graph


def unsupported_reason(model) -> str | None:
    """Why `model` cannot be captioned by `GraphedGreedyDecoder`, or None when it can."""
    if model.config.model_type != "blip-2":
        return f"a {model.config.model_type} model (graphed decoding is for BLIP-2)"
    if model.config.text_config.is_encoder_decoder:
        return "BLIP-2 with an encoder-decoder language model (graphed decoding is for decoder-only ones, e.g. OPT)"
    config = model.language_model.generation_config
    changed = [name for name, neutral in _NEUTRAL.items()  # unset is None in transformers 5
               if getattr(config, name, None) not in (None, neutral, [])]
    if changed:
        return f"its generation config sets {', '.join(changed)}, which graphed greedy decoding does not apply"
    return None


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """BLIP-2's vision tower: one embedding per image patch."""
    return model.vision_model(pixel_values).last_hidden_state


def query_features(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """BLIP-2's Q-Former over the image features, projected to the language model's inputs (one per query token)."""
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_mask).last_hidden_state
    return model.language_projection(query_output.to(image_embeds.dtype))  # the Q-Former runs in fp32


class _Step:
    """The decoding step on fixed buffers: `token` and `position` in, `next_token` out; `visible` is the attention
    mask over the whole cache, each slot opened as it is filled."""

    def __init__(self, language_model, cache, batch: int, prompt: int, max_new_tokens: int, dtype: torch.dtype,
                 device: torch.device):
        self.language_model, self.cache = language_model, cache
        self.cache_keyword = "cache" if "cache" in inspect.signature(language_model.forward).parameters \
            else "past_key_values"  # transformers renamed it after 5.17
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.next_token = torch.zeros(batch, dtype=torch.long, device=device)
        self.visible = torch.full((batch, 1, 1, prompt + max_new_tokens), torch.finfo(dtype).min, dtype=dtype,
                                  device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False

    def __call__(self) -> None:
        logits = self.language_model(input_ids=self.token, attention_mask=self.visible, position_ids=self.position,
                                     use_cache=True, logits_to_keep=1, **{self.cache_keyword: self.cache}).logits
        self.next_token.copy_(logits[:, -1].argmax(-1))

    def run(self, capture_now: bool) -> None:
        """One step: replayed if captured, else eagerly (capturing it right after, when `capture_now`)."""
        if self.graph is not None:
            self.graph.replay()
            return
        on_cuda = self.token.device.type == "cuda"
        side = torch.cuda.Stream() if on_cuda else None
        if side is not None:  # as CUDA graphs want their warm-up: on a side stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self()
            torch.cuda.current_stream().wait_stream(side)
        else:
            self()
        if capture_now and on_cuda and not self.capture_failed:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):  # records, runs nothing: the cache is not advanced by the capture
                    self()
            except RuntimeError as err:  # e.g. a host synchronisation inside the model's forward
                self.capture_failed = True
                log.warning("graphed decoding: the step could not be captured (%s); it runs eagerly",
                            str(err).splitlines()[0])
                return
            self.graph = graph


class GraphedGreedyDecoder:
    """`model.generate(pixel_values=..., input_ids=..., do_sample=False, num_beams=1, max_new_tokens=...)` for a
    BLIP-2 `model`, its decoding step replayed from a CUDA graph on CUDA. Keeps one static cache and graph per batch
    shape it has seen (a run has at most two: its batches and a shorter last one)."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"graphed decoding cannot caption with {reason}; use --kv-cache dynamic or static")
        self.model = model
        config = model.language_model.generation_config
        eos = config.eos_token_id
        self.eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
        self.pad = config.pad_token_id if config.pad_token_id is not None else (int(self.eos[0]) if len(self.eos)
                                                                                 else 0)
        self._steps: dict[tuple[int, int, int], _Step] = {}

    def _embeddings(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The language model's input: the prompt's embeddings with the image's query outputs at its image tokens
        (as `Blip2ForConditionalGeneration.generate` builds them)."""
        model = self.model
        language_inputs = query_features(model, image_features(model, pixel_values))
        embeddings = model.get_input_embeddings()(input_ids)
        image_tokens = (input_ids == model.config.image_token_index).unsqueeze(-1)
        return embeddings.masked_scatter(image_tokens, language_inputs.to(embeddings.dtype))

    def _step_for(self, batch: int, prompt: int, max_new_tokens: int, dtype: torch.dtype,
                  device: torch.device) -> _Step:
        key = (batch, prompt, max_new_tokens)
        if key not in self._steps:
            from transformers import StaticCache

            language_model = self.model.language_model
            cache = StaticCache(config=language_model.config, max_cache_len=prompt + max_new_tokens)
            self._steps[key] = _Step(language_model, cache, batch, prompt, max_new_tokens, dtype, device)
        return self._steps[key]

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        batch, prompt = input_ids.shape
        embeddings = self._embeddings(pixel_values, input_ids)
        step = self._step_for(batch, prompt, max_new_tokens, embeddings.dtype, embeddings.device)
        step.cache.reset()
        step.visible.fill_(torch.finfo(step.visible.dtype).min)
        step.visible[..., :prompt] = 0
        positions = torch.arange(prompt, device=input_ids.device).expand(batch, -1)
        logits = step.language_model(inputs_embeds=embeddings, attention_mask=torch.ones_like(input_ids),
                                     position_ids=positions, use_cache=True, logits_to_keep=1,
                                     **{step.cache_keyword: step.cache}).logits
        eos = self.eos.to(input_ids.device)
        token = logits[:, -1].argmax(-1)
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        tokens = []
        for n in range(max_new_tokens):
            token = torch.where(unfinished, token, self.pad)  # after its end a caption gets padding, as in generate
            tokens.append(token)
            unfinished &= ~torch.isin(token, eos)
            if n + 1 == max_new_tokens or not bool(unfinished.any()):
                break
            step.token.copy_(token.unsqueeze(1))
            step.position.fill_(prompt + n)
            step.visible[..., prompt + n] = 0
            step.run(capture_now=n + 1 == _EAGER_STEPS)
            token = step.next_token.clone()
        return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
