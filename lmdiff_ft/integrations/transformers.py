"""transformers: cache layers (dynamic and static) with extra per-layer state, loading a lazy state dict,
TensorBoard's directory, and the Trainer's evaluations during training made ours.

Checked against transformers 5.24.0.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel, Trainer
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.integrations.integration_utils import default_logdir
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import is_torchdynamo_compiling


class LayerStates:
    """Named extra states of a cache layer (tensors, or tuples of tensors) that must follow the batch with the keys.

    `extra_states` names attributes that `generate` must reorder with the keys: beam search calls `reorder_cache` on
    every layer. A layer writes them with `write_state`. Extra states are usually running sums, which cannot be
    rewound: such a layer refuses `crop`. Mixed into a transformers cache layer class, before it.
    """

    extra_states: tuple[str, ...] = ()
    is_croppable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.extra_states:
            setattr(self, name, None)

    def write_state(self, name: str, value: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        setattr(self, name, value)

    def _map_states(self, fn) -> None:
        for name in self.extra_states:
            state = getattr(self, name)
            if isinstance(state, tuple):
                setattr(self, name, tuple(fn(t) for t in state))
            elif state is not None:
                setattr(self, name, fn(state))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("this cache's running sums cannot be cropped; re-run the prefill instead")


class DynamicLayerWithStates(LayerStates, DynamicLayer):
    """transformers' `DynamicLayer`, plus extra states (`LayerStates`), and keys/values that grow in place.

    Batch slicing calls `batch_repeat_interleave` and `batch_select_indices` on every layer, which the states follow
    too. Keys and values are written in place into buffers that double when full (`keys`/`values` are views of their
    filled part), so a decode step writes one token where `DynamicLayer`'s `torch.cat` copies the whole cache: that
    copy made the time per token grow with the context.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if not self._buffers_hold_cache() or end > self.key_buffer.shape[-2]:
            self.key_buffer = self._grown(self.keys, key_states, start, max(end, 2 * start))
            self.value_buffer = self._grown(self.values, value_states, start, max(end, 2 * start))
        self.key_buffer[..., start:end, :].copy_(key_states)
        self.value_buffer[..., start:end, :].copy_(value_states)
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _buffers_hold_cache(self) -> bool:
        """False once `DynamicLayer`'s methods (reorder, select, offload) replaced `keys` by a new tensor."""
        return self.key_buffer is not None and self.keys.data_ptr() == self.key_buffer.data_ptr()

    @staticmethod
    def _grown(cached: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if length:
            buffer[..., :length, :].copy_(cached)
        return buffer

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_states(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None
        for name in self.extra_states:
            setattr(self, name, None)


class StaticLayerWithStates(LayerStates, StaticLayer):
    """transformers' `StaticLayer` (keys and values preallocated for `max_cache_len` tokens, written in place, which is
    what `torch.compile` and `cache_implementation="static"` need), plus extra states of a fixed size, allocated at
    their first write and then written in place too, so a compiled decode step sees the same tensors every time.
    `reset` zeroes them, which for running sums and a conv window is the same as no state at all."""

    def write_state(self, name: str, value: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        state = getattr(self, name)
        if state is None:
            state = tuple(t.clone() for t in value) if isinstance(value, tuple) else value.clone()
            if not is_torchdynamo_compiling():
                for tensor in state if isinstance(state, tuple) else (state,):
                    torch._dynamo.mark_static_address(tensor)
            setattr(self, name, state)
            return
        targets = state if isinstance(state, tuple) else (state,)
        sources = value if isinstance(value, tuple) else (value,)
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)

    def reset(self) -> None:
        super().reset()
        self._map_states(lambda t: t.zero_())


def with_layers_of(
    cache: Cache, num_layers: int, dynamic: type[DynamicLayerWithStates], static: type[StaticLayerWithStates]
) -> Cache:
    """The cache, holding the model's own layer classes. `generate`, and users following transformers' docs, make a
    `DynamicCache` or `StaticCache` from the config, which fills it with plain `DynamicLayer`s or `StaticLayer`s (a
    `DynamicCache()` without a config has none yet); they are replaced while the cache is still empty. A cache that
    already holds `num_layers` of the model's layers is returned as it is; anything else is refused."""
    layers = cache.layers
    if len(layers) == num_layers and all(isinstance(layer, (dynamic, static)) for layer in layers):
        return cache
    empty = not any(layer.is_initialized for layer in layers)
    if isinstance(cache, StaticCache) and empty and all(type(layer) is StaticLayer for layer in layers):
        cache.layers = [static(max_cache_len=layer.max_cache_len) for layer in layers]
    elif isinstance(cache, DynamicCache) and empty and all(type(layer) is DynamicLayer for layer in layers):
        cache.layers = [dynamic() for _ in range(num_layers)]
        cache.layer_class_to_replicate = None  # no layer is added on the fly: all are here
    else:
        found = ", ".join(sorted({type(layer).__name__ for layer in layers})) or "no layers"
        raise TypeError(
            f"this model needs an empty DynamicCache or StaticCache (or one it filled), got {type(cache).__name__} of "
            f"{found}"
        )
    return cache


def causal_lm_from_state_dict(config: PretrainedConfig, state_dict: dict, **from_pretrained_kwargs) -> PreTrainedModel:
    """`from_pretrained` of the config's causal-LM class with weights from `state_dict` (which may hold lazy
    safetensors slices: transformers reads each one when it places or quantizes it). A name and a state dict are
    exclusive, so the name is passed as None; the caller records the path."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=state_dict, **from_pretrained_kwargs)


@contextmanager
def tensorboard_logs_in(out: Path) -> Iterator[None]:
    """transformers' TensorBoard callback picks `out/runs/<date>` only when training begins; an evaluation before
    training logs first, which made it open its writer in ./runs of the working directory and keep it for the
    whole run. Its documented TENSORBOARD_LOGGING_DIR, read when the callback is created, pins the directory; it is
    restored afterwards so that no later trainer in this process inherits it."""
    previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / default_logdir())  # runs/<date>_<host>, as transformers names it
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR")
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = previous


def evaluate_with(trainer: Trainer, compute: Callable[[], dict[str, float]]) -> None:
    """Make the Trainer's evaluations during training (every `eval_steps`) report `compute()`'s metrics instead of
    running its own evaluation loop, and keep what `Trainer.evaluate` does with them: log them (log history,
    TensorBoard, MLflow, W&B) and pass them to the callbacks' `on_evaluate` (early stopping). `metric_for_best_model`
    then picks the best checkpoint by them. Checked against transformers 5.24.0: trainer.py's `_evaluate` calls
    `self.evaluate()`, which runs the loop, then `self.log(metrics)`, then `on_evaluate`, and returns the metrics;
    tests/test_integrations.py notices if that changes."""

    def evaluate(eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = compute()
        trainer.log(metrics)
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics

    trainer.evaluate = evaluate
