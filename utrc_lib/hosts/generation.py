"""Generation from a reduced prefill: the SSM state hand-over, and reduce once / ask many.

Glossary: utrc_lib/GLOSSARY.md (B batch, N context tokens, N' tokens after reductions, M question
tokens, D d_model, Di SSM inner width, H heads, P head dim, S state size, K conv width, L layers).

What a reduced prefill hands to decoding. Every layer l of an SSM ends a prefill with two
fixed-size tensors: its conv state (the last K inputs of its depthwise convolution, (B, C, K)) and
its SSM state ((B, H, P, S) for Mamba-2, (B, Di, S) for Mamba-1). Decoding only reads and updates
them, so a prefill with token reduction needs nothing else to be continued, and decoding stays
dense (one token at a time; nothing to reduce). The state after a reduced prefill is, by
definition, the state of the *reduced sequence*:

  * layers 0 .. a1 (up to and including the first anchor a1) see all N tokens: their states are
    those of a dense prefill over the N tokens;
  * a layer l in (a_k, a_k+1] sees the stream after anchor a_k, N'_k tokens in ascending original
    position, a merged token as its merged (size-weighted) vector: its state is that of running
    layers a_k + 1 .. l densely, with a fresh cache, over that reduced stream. The conv state holds
    the last K *kept* inputs (the protected last tokens are always kept, so with protect_last >= K
    those are the context's own last K tokens).

`tests/test_generation.py` checks both statements on CPU (bit-identical in float32 on the
transformers host), and that at keep_ratio 1 the state equals a dense prefill's and greedy tokens
equal the unpatched model's.

API (exported by the package root):

    state = utrc_lib.prefill(model, context_ids, config)        # reduce once (PrefillState)
    out = utrc_lib.generate_from(model, state, question_ids, max_new_tokens=32)   # ask many
    # (B, max_new_tokens) greedy tokens; `state` is never modified, so it serves any number of questions

A state of batch 1 serves a batch of B questions (broadcast). Question tokens are not reduced:
they continue the state through the host's own cached forward: one chunked forward on
transformers Mamba-2 (its scan takes the cached state as the initial state), one token at a time
on transformers Mamba-1 (its full-sequence scan starts from a zero state) and on mamba-ssm (its
chunked forward takes no initial state; the steps are CUDA-graph replays when `cg=True`).

mamba-ssm CUDA graphs: `GraphDecoder` captures the decoding step with mamba-ssm's public
`update_graph_cache` (the capture `generate(cg=True)` makes) and fills the conv / SSM tensors that
the graph reads, in place: either by running the (reduced) prefill into them, as
`generate(cg=True)` does, or by copying a PrefillState in. mamba-ssm's own `generate(cg=True)` works
under `utrc_lib.apply` unchanged (its prefill is the patched forward; its graph runs the untouched
decoding step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import weakref
from typing import Optional, Sequence, Union

import torch

from ..core.config import ReductionConfig

Tensor = torch.Tensor


# -- the state ------------------------------------------------------------------------------------
@dataclasses.dataclass
class PrefillState:
    """Everything a prefill leaves for decoding, host independent (a snapshot: never modified).

    host: "hf" or "mamba_ssm"; conv[l]: (B, C, K) conv state of layer l; ssm[l]: (B, H, P, S)
    (Mamba-2) or (B, Di, S) (Mamba-1); logits: (B, V) next-token logits after the context (float32);
    num_tokens: N context tokens; layer_tokens[l]: tokens layer l's state covers (N up to the first
    anchor, N'_k after anchor a_k); config: the reduction (None: dense); achieved_cut: (B,) token-layer
    cut the prefill reached (None when nothing was reduced).
    """

    host: str
    conv: tuple
    ssm: tuple
    logits: Tensor
    num_tokens: int
    layer_tokens: tuple
    config: Optional[ReductionConfig] = None
    achieved_cut: Optional[Tensor] = None

    @property
    def batch(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.ssm)

    def nbytes(self) -> int:
        """Bytes of the conv + SSM state (what decoding reads and writes per step, batch included)."""
        return sum(t.numel() * t.element_size() for t in (*self.conv, *self.ssm))


def host_name(model) -> str:
    """"hf" (transformers Mamba / Mamba-2) or "mamba_ssm"; ValueError for anything else."""
    from .handle import host_for

    module = host_for(model).__name__
    return "mamba_ssm" if module.endswith("mamba_ssm") else "hf"


def _is_mamba2(model) -> bool:
    mixer = model.backbone.layers[0].mixer
    return hasattr(mixer, "dt_bias") and (hasattr(mixer, "num_heads") or hasattr(mixer, "nheads"))


def _check_ids(ids, name: str, model) -> Tensor:
    """(N,) or (B, N) integer tensor -> (B, N) on the model's device; ValueError on anything else."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.LongTensor of token ids, got {type(ids).__name__}")
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (N,) or (B, N), got shape {tuple(ids.shape)}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(ids.shape)}")
    vocab = _vocab(model)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} holds ids outside [0, {vocab}): min {lo}, max {hi}")
    device = next(model.parameters()).device
    return ids.to(device=device, dtype=torch.long)


def _vocab(model) -> int:
    emb = getattr(model.backbone, "embeddings", None) or getattr(model.backbone, "embedding")
    return int(emb.num_embeddings)


def _layer_tokens(reducer, num_layers: int, n: int) -> tuple:
    """Tokens each layer's state covers: N before and at the first anchor, the count after each anchor
    from the next layer on (ints when every sample has the same count, else per-sample lists)."""
    out, cur, counts = [], n, list(reducer.counts) if reducer is not None and reducer.reduced else []
    it = iter(counts)
    nxt = next(it, None)
    for layer in range(num_layers):
        out.append(cur if isinstance(cur, int) else list(cur))
        if nxt is not None and layer == nxt[0]:
            c = nxt[1]
            cur = c if isinstance(c, int) else [int(x) for x in c.tolist()]
            nxt = next(it, None)
    return tuple(out)


# -- host decoders: fill a cache, feed tokens, step -------------------------------------------------
class CacheDecoder:
    """transformers host: a fresh `DynamicCache` holding a state; greedy steps through `model(...)`.

    The model may be patched: a forward that continues a filled cache is never reduced
    (utrc_lib/hosts/hf.py), so the question and the decoding run dense.
    """

    def __init__(self, model):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "cache_params"  # 5.24+ / up to 5.23
        self.mamba2 = _is_mamba2(model)
        self.cache = None
        self.offset = 0

    def _forward(self, ids: Tensor) -> Tensor:
        out = self.model(ids, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        cache = getattr(out, "cache", None) if self.cache_arg == "cache" else getattr(out, "cache_params", None)
        self.cache = cache if cache is not None else self.cache
        self.offset += ids.shape[1]
        return out.logits[:, -1].float()  # (B, V)

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """(B, N) context -> (B, V) next-token logits; the cache then holds the prefill's state."""
        self.cache, self.offset = None, 0
        return self._forward(ids)

    @torch.inference_mode()
    def load(self, state: PrefillState, batch: int) -> None:
        """A fresh cache holding `state` (broadcast from batch 1 to `batch` when the state has one row)."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if not (hasattr(cache, "update_conv_state") and hasattr(cache, "update_recurrent_state")):
            raise NotImplementedError("utrc_lib.generate_from needs transformers >= 5.24 (the linear-attention "
                                      "cache API: update_conv_state / update_recurrent_state)")
        for i, (conv, ssm) in enumerate(zip(state.conv, state.ssm)):
            conv = conv.expand(batch, *conv.shape[1:]).clone()
            ssm = ssm.expand(batch, *ssm.shape[1:]).clone()
            cache.update_conv_state(conv, i, conv_kernel_size=conv.shape[-1])
            cache.update_recurrent_state(ssm, i)
        self.cache, self.offset = cache, state.num_tokens

    @torch.inference_mode()
    def feed(self, ids: Tensor) -> Tensor:
        """Continue the state with (B, M) tokens (not reduced) -> (B, V) logits after the last one."""
        if self.mamba2:
            return self._forward(ids)
        logits = None
        for j in range(ids.shape[1]):  # transformers' Mamba-1 scan over a sequence starts from zero
            logits = self._forward(ids[:, j:j + 1])
        return logits

    @torch.inference_mode()
    def step(self, tok: Tensor) -> Tensor:
        """(B, 1) token -> (B, V) logits."""
        return self._forward(tok)

    @torch.inference_mode()
    def state(self) -> tuple[tuple, tuple]:
        """(conv, ssm) per layer, cloned from the cache."""
        n = len(self.model.backbone.layers)
        conv = tuple(self.cache.get_conv_state(i).clone() for i in range(n))
        ssm = tuple(self.cache.get_recurrent_state(i).clone() for i in range(n))
        return conv, ssm


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# model -> mamba-ssm DecodingCGCache (captured graphs of the decoding step)
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class GraphDecoder:
    """mamba-ssm host: decoding through `InferenceParams`, with CUDA graphs when `cg` (GPU only).

    cg=True: the decoding step is captured by mamba-ssm's `update_graph_cache` (kept per model and
    reused while the batch size is the same and the length fits; mamba-ssm's cache keeps its state
    tensors when the batch shrinks, so another batch size captures anew); `capture_ms` says what the
    capture cost (0 when reused). The prefill writes the conv / SSM tensors the graph reads.
    cg=False: mamba-ssm's Python decoding path (`model(tok, inference_params=...)` per token).
    """

    require_cuda = True  # the CPU tests swap mamba-ssm's capture for an eager stand-in

    def __init__(self, model, batch: int, max_seqlen: int, cg: bool = True):
        from mamba_ssm.utils.generation import InferenceParams

        self.model, self.batch, self.cg = model, int(batch), bool(cg)
        self.capture_ms = 0.0
        self.device = next(model.parameters()).device
        if self.cg:
            if self.require_cuda and self.device.type != "cuda":
                raise ValueError("cg=True (CUDA-graph decoding) needs the model on a CUDA device")
            import time

            from mamba_ssm.utils.generation import update_graph_cache

            cache = _GRAPHS.get(model)
            if cache is not None and (cache.max_batch_size != self.batch or cache.max_seqlen < max_seqlen):
                cache = None
            fresh = cache is None
            _sync(self.device)
            t0 = time.perf_counter()
            cache = update_graph_cache(model, cache, self.batch, 1, max(max_seqlen, getattr(cache, "max_seqlen", 0)))
            _sync(self.device)
            self.capture_ms = (time.perf_counter() - t0) * 1e3 if fresh else 0.0
            _GRAPHS[model] = cache
            self.graphs = cache
            self.params = cache.inference_params
        else:
            self.params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=self.batch)
        self.params.seqlen_offset = 0

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """(B, N) context -> (B, V) logits; the (reduced, when patched) prefill writes the states."""
        if ids.shape[0] != self.batch:
            raise ValueError(f"this decoder holds a batch of {self.batch}, got {ids.shape[0]} prompts")
        self.params.seqlen_offset = 0
        logits = self.model(ids, inference_params=self.params, num_last_tokens=1).logits[:, -1]
        self.params.seqlen_offset = ids.shape[1]
        return logits.float()

    def state_bytes(self) -> int:
        """Bytes of the conv + SSM state tensors decoding reads and writes (0 before a prefill)."""
        return sum(t.numel() * t.element_size() for pair in self.params.key_value_memory_dict.values() for t in pair)

    def _states(self):
        layers = self.model.backbone.layers
        return [self.params.key_value_memory_dict[layer.mixer.layer_idx] for layer in layers]

    @torch.inference_mode()
    def load(self, state: PrefillState, batch: int) -> None:
        """Copy `state` into the tensors decoding reads (in place: the graph reads their addresses)."""
        if batch != self.batch:
            raise ValueError(f"this decoder holds a batch of {self.batch}, asked for {batch}")
        if not self.params.key_value_memory_dict:  # cg=False: allocate as the prefill would
            self.params.key_value_memory_dict.update(self.model.allocate_inference_cache(self.batch, 1))
        for (conv_t, ssm_t), conv, ssm in zip(self._states(), state.conv, state.ssm):
            conv_t.copy_(conv)  # (1 or B, C, K) broadcast to (B, C, K)
            ssm_t.copy_(ssm)
        self.params.seqlen_offset = state.num_tokens

    @torch.inference_mode()
    def step(self, tok: Tensor) -> Tensor:
        """(B, 1) token -> (B, V) logits (one graph replay when cg)."""
        pos = torch.full((self.batch, 1), self.params.seqlen_offset, dtype=torch.long, device=tok.device)
        if self.cg:
            logits = self.graphs.run(tok, pos, self.params.seqlen_offset)
        else:
            logits = self.model(tok, position_ids=pos, inference_params=self.params, num_last_tokens=1).logits
        self.params.seqlen_offset += 1
        return logits[:, -1].float()

    @torch.inference_mode()
    def feed(self, ids: Tensor) -> Tensor:
        """Continue with (B, M) tokens one step each (mamba-ssm's chunked forward takes no initial state)."""
        logits = None
        for j in range(ids.shape[1]):
            logits = self.step(ids[:, j:j + 1])
        return logits

    @torch.inference_mode()
    def state(self) -> tuple[tuple, tuple]:
        st = self._states()
        return tuple(c.clone() for c, _ in st), tuple(s.clone() for _, s in st)


def decoder_for(model, batch: int, max_seqlen: int, cg: Optional[bool] = None):
    """The host's decoder: `CacheDecoder` (transformers) or `GraphDecoder` (mamba-ssm; cg default:
    True on CUDA)."""
    if host_name(model) == "hf":
        if cg:
            raise ValueError("cg=True is mamba-ssm's CUDA-graph decoding; transformers models decode through "
                             "their cache (use generate(..., cache_implementation=...) for compiled decoding)")
        return CacheDecoder(model)
    if cg is None:
        cg = next(model.parameters()).device.type == "cuda"
    return GraphDecoder(model, batch, max_seqlen, cg=cg)


# -- the public API ---------------------------------------------------------------------------------
def _handle_of(model):
    return model.__dict__.get("_utrc_handle")


@torch.inference_mode()
def prefill(model, context_ids, config: Optional[ReductionConfig] = None, *, protect_last=None) -> PrefillState:
    """Run one (reduced) prefill over `context_ids` and return its state (reduce once).

    Args:
        model: transformers MambaForCausalLM / Mamba2ForCausalLM or mamba-ssm MambaLMHeadModel.
        context_ids: (N,) or (B, N) token ids (equal-length rows; no padding).
        config: the reduction, applied for this prefill only. None: the model's own patch when it is
            patched (`utrc_lib.apply`), else a dense prefill. A config for a model that is already
            patched is refused (ambiguous: remove the handle or pass config=None).
        protect_last: per-forward protected tail (int or (B,)), as `handle.options(protect_last=...)`.
    Returns: PrefillState (conv / SSM state per layer, last logits, tokens each layer covers).
    """
    from .handle import apply

    if config is not None and not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a utrc_lib.ReductionConfig or None, got {type(config).__name__}")
    host = host_name(model)
    ids = _check_ids(context_ids, "context_ids", model)
    B, N = ids.shape
    handle, own = _handle_of(model), False
    if config is not None:
        if handle is not None:
            raise RuntimeError("utrc: this model is already patched; pass config=None to prefill with its handle, "
                               "or call handle.remove() first")
        handle, own = apply(model, config), True
    try:
        dec = decoder_for(model, B, N + 1, cg=False)
        if handle is not None:
            opts = handle.options(protect_last=protect_last) if protect_last is not None else contextlib.nullcontext()
            with opts:
                logits = dec.prefill(ids)
                reducer = handle.last_reducer
        else:
            if protect_last is not None:
                raise ValueError("protect_last needs a reduction (config, or a patched model)")
            logits, reducer = dec.prefill(ids), None
        conv, ssm = dec.state()
        cfg = handle.config if handle is not None else None
    finally:
        if own:
            handle.remove()
    reduced = reducer is not None and reducer.reduced
    return PrefillState(host=host, conv=conv, ssm=ssm, logits=logits, num_tokens=N,
                        layer_tokens=_layer_tokens(reducer, len(ssm), N), config=cfg,
                        achieved_cut=reducer.achieved_cut() if reduced else None)


@torch.inference_mode()
def _check_state_shapes(model, state: PrefillState) -> None:
    """A state from another architecture or width (e.g. a Mamba-2 state given to a Mamba-1 model):
    ValueError naming both, instead of a raw size mismatch when the cache is filled."""
    mixer = model.backbone.layers[0].mixer
    mamba2 = hasattr(mixer, "dt_bias") or hasattr(mixer, "num_heads") or hasattr(mixer, "nheads")
    kind = "Mamba-2" if mamba2 else "Mamba-1"
    got = "Mamba-2" if state.ssm and state.ssm[0].dim() == 4 else "Mamba-1"
    conv = getattr(mixer, "conv1d", None)
    width_ok = conv is None or not state.conv or state.conv[0].shape[1] == conv.weight.shape[0]
    if got != kind or not width_ok:
        shape = tuple(state.ssm[0].shape) if state.ssm else ()
        raise ValueError(f"this state comes from a {got} model (SSM state {shape}, conv state "
                         f"{tuple(state.conv[0].shape) if state.conv else ()}), but the model is a {kind} one "
                         f"(conv width {conv.weight.shape[0] if conv is not None else '?'}): prefill the context "
                         f"with this model (utrc_lib.prefill(model, ...)) and pass that state")


def generate_from(model, state: PrefillState, question_ids=None, *, max_new_tokens: int = 32,
                  eos_token_id: Union[int, Sequence[int], None] = None, cg: Optional[bool] = None) -> Tensor:
    """Greedy continuation of a prefill's state (ask many): the question, then `max_new_tokens` tokens.

    Args:
        model: the model `state` came from (same host; its patch, if any, does not touch this:
            continuations of a state are never reduced).
        state: a PrefillState from `prefill`; not modified, so it serves any number of questions.
        question_ids: (M,) or (B, M) tokens that continue the context (not reduced), or None. A state of
            batch 1 serves B questions; otherwise B must equal the state's batch.
        max_new_tokens: tokens to generate (>= 1).
        eos_token_id: a row that produced it keeps producing it (the output stays rectangular);
            generation stops early when every row has.
        cg: mamba-ssm only: CUDA-graph decoding (default True on CUDA).
    Returns: (B, max_new_tokens) generated token ids (question not included), or fewer columns when
    every row reached eos earlier.
    """
    if not isinstance(state, PrefillState):
        raise TypeError(f"state must be a PrefillState from utrc_lib.prefill, got {type(state).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    host = host_name(model)
    if host != state.host:
        raise ValueError(f"this state comes from a {state.host} model, not a {host} one")
    if state.num_layers != len(model.backbone.layers):
        raise ValueError(f"this state has {state.num_layers} layers, the model {len(model.backbone.layers)}")
    q = _check_ids(question_ids, "question_ids", model) if question_ids is not None else None
    B = q.shape[0] if q is not None else state.batch
    if state.batch not in (1, B):
        raise ValueError(f"question_ids has {B} row(s), but this state holds {state.batch} contexts (batch "
                         f"{state.batch}): pass exactly {state.batch} question rows, one per context, or prefill "
                         f"a single context (batch 1), whose state serves any number of questions")
    _check_state_shapes(model, state)
    eos = None
    if eos_token_id is not None:
        eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                              dtype=torch.long)
    M = q.shape[1] if q is not None else 0
    dec = decoder_for(model, B, state.num_tokens + M + max_new_tokens + 1, cg=cg)
    dec.load(state, B)
    logits = dec.feed(q) if q is not None else state.logits.expand(B, -1)
    return greedy(dec, logits, max_new_tokens, eos)


def greedy(dec, logits: Tensor, max_new_tokens: int, eos: Optional[Tensor] = None) -> Tensor:
    """Greedy tokens from `logits` (B, V) on, stepping `dec`; (B, <= max_new_tokens)."""
    out = []
    done = None
    eos = eos.to(logits.device) if eos is not None else None
    for t in range(max_new_tokens):
        tok = logits.argmax(-1, keepdim=True)  # (B, 1)
        if eos is not None:
            if done is None:
                done = torch.zeros_like(tok, dtype=torch.bool)
            tok = torch.where(done, eos[:1].expand_as(tok), tok)
            done = done | torch.isin(tok, eos)
        out.append(tok)
        if t + 1 == max_new_tokens or (done is not None and bool(done.all())):
            break
        logits = dec.step(tok)
    return torch.cat(out, 1)


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int = 32, config: Optional[ReductionConfig] = None, *,
             eos_token_id=None, cg: Optional[bool] = None) -> Tensor:
    """One request: (reduced) prefill over `input_ids`, then greedy decoding, without a snapshot
    (mamba-ssm: the prefill writes straight into the graph's state tensors, as generate(cg=True)).
    Returns (B, <= max_new_tokens) new tokens."""
    from .handle import apply

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ids = _check_ids(input_ids, "input_ids", model)
    handle, own = _handle_of(model), False
    if config is not None:
        if handle is not None:
            raise RuntimeError("utrc: this model is already patched; pass config=None or call handle.remove() first")
        handle, own = apply(model, config), True
    try:
        dec = decoder_for(model, ids.shape[0], ids.shape[1] + max_new_tokens + 1, cg=cg)
        logits = dec.prefill(ids)
    finally:
        if own:
            handle.remove()
    eos = None
    if eos_token_id is not None:
        eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    return greedy(dec, logits, max_new_tokens, eos)
