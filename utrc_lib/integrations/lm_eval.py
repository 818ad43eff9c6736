"""`--model utrc` for lm-eval 0.4.x: a thin LM subclass around `utrc_lib.scoring`.

model_args: pretrained=<tiny-mamba2 | tiny-mamba | checkpoint dir | hub id> plus the reduction:
method (none/absent = dense), flops_reduction | keep_ratio, metric, layers ("12;17;22"), q,
hidden_rule, residual_rule, causal (default: the method's own, False only for utrc_reference),
seed, metric_source, align, protect_last; and protect (default True), details (default False), max_length, dtype, device
(default "auto": CUDA when torch sees a GPU, else CPU; `resolve_lm_device`), batch_size, progress. The reduction arguments go through `utrc_lib.core.config.config_from_args`, the one
builder every entry point uses (strict parsing; errors name the field). Example:

    python -m utrc_lib.integrations.lm_eval_cli --model utrc --model_args pretrained=tiny-mamba2,method=utrc,flops_reduction=0.2 \
        --tasks utrc_choice2 --include_path utrc_study/eval/lm_eval_tasks
    (lm-eval's own CLI after the import that registers "utrc"; the console script `utrc-lm-eval` is
    the same; the package also declares the `lm_eval.models` entry point)

Scoring (`utrc_lib.scoring.score_tokens`): lm-eval's tokenisation of (context, continuation);
requests sorted by length and batched with LEFT padding and an attention mask; each row's
reduction runs with protect_last = its own number of continuation tokens (per-sample
protect_last), so the scored positions are never reduced and never see later tokens;
continuation log-probs are read by ORIGINAL position (the patched model returns full-length
logits); results do not depend on batch size or composition. The patch is installed per call and
removed in a `finally` block, so the model is dense again after every call. Requests whose context
is too short to reduce are scored dense and counted (`dense_fallback_last_call`, `dense_fallback`
in `reduction_metadata`). `reduction_metadata` (method, keep ratio, layers, token-layer FLOPs cut,
analytic FLOPs, versions) is what `python -m utrc_study.eval` writes under "utrc".

Item level (opt-in, `details=True`; the scores are the same numbers either way): every scoring call
also records one `utrc_lib.scoring.RequestDetail` per request (ll, scored tokens, greedy, and against
the dense model at the scored positions: summed KL(dense || scored) and top-1 agreement; a reduced
call runs a dense forward of each batch beside the reduced one, so it costs about twice as much).
They are kept in `request_details[(request_type, args)]` (a rolling request: summed over its
windows), where `args` is the lm-eval request's arguments, as lm-eval's per-sample log
(`log_samples`) lists them; `utrc_study.eval.lm_eval_rows` turns the two into per-item rows.

Data parallel (lm-eval's own scheme): under `accelerate launch --num_processes N` (WORLD_SIZE > 1 in
the environment) the adapter creates an `accelerate.Accelerator`, puts the model on
`accelerator.device` (one GPU per process; `--cpu` gives N CPU processes over gloo) and exposes
`rank` / `world_size` / `accelerator` plus `all_gather`, `gather_object` and `barrier`. lm-eval's
evaluator then gives each rank every N-th document, pads ranks to equal request counts, and gathers
the per-document metrics on rank 0, which alone returns results. Since scoring does not depend on
batch composition, the numbers equal the single-process run on the same items. A single process
(no WORLD_SIZE > 1) creates no Accelerator and behaves exactly as before.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .. import scoring as ev
from ..core.config import BUILDER_FIELDS, ReductionConfig, config_from_args, parse_bool

# model_args that describe the reduction (everything else is a model / scoring argument)
REDUCTION_ARGS = BUILDER_FIELDS


def launched_world_size() -> int:
    """Number of processes of the launcher that started us (accelerate launch / torchrun), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


LM_EVAL_DEFAULT_DEVICE = "cuda:0"   # what lm-eval's CLI passes when --device is not given


def resolve_lm_device(device: Optional[str]) -> str:
    """The adapter's device: None / "auto" -> CUDA when torch sees a GPU, else CPU. lm-eval's CLI
    passes "cuda:0" when --device is not given: without CUDA that default becomes "cpu" (with a
    warning); any other CUDA device asked for without CUDA is a ValueError naming the fix."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    d = str(device)
    if d.startswith("cuda") and not torch.cuda.is_available():
        if d == LM_EVAL_DEFAULT_DEVICE:
            import warnings

            warnings.warn("--model utrc: lm-eval's default device cuda:0 is not available (torch sees no CUDA "
                          "device): using cpu; pass --device cpu (or auto) to say so")
            return "cpu"
        raise ValueError(f"--model utrc: device {d!r} was asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); pass --device auto or --device cpu")
    return d


def build_config(**kw) -> Optional[ReductionConfig]:
    """ReductionConfig from lm-eval-style model_args (strings or parsed values); None = dense.
    Same as `config_from_args(**kw)`."""
    return config_from_args(**kw)


class _LocalTaskAdvice(logging.Filter):
    """Drops lm-eval's "Custom kwargs can be passed to `--metadata`" advice for our own utrc_* tasks,
    whose loaders take no arguments (it is printed once per task on every run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("utrc_") and "Custom kwargs can be passed" in msg)


_task_log = logging.getLogger("lm_eval.api.task")
if not any(isinstance(f, _LocalTaskAdvice) for f in _task_log.filters):
    _task_log.addFilter(_LocalTaskAdvice())


def _summed(details: list):
    """One RequestDetail for the windows of a rolling request: ll, tokens, KL and top-1 summed."""
    have = bool(details) and all(d.kl is not None for d in details)
    return ev.RequestDetail(ll=sum(d.ll for d in details), tokens=sum(d.tokens for d in details),
                            greedy=all(d.greedy for d in details),
                            kl=sum(d.kl for d in details) if have else None,
                            top1=sum(d.top1 for d in details) if have else None)


@register_model("utrc")
class UTRCLM(LM):
    """lm-eval LM for transformers Mamba / Mamba-2 with utrc token reduction (CPU or CUDA).

    Subclasses lm-eval's bare `LM`, not `HFLM`: HFLM right-pads its batches and scores whatever
    logits the model returns, one batch-wide forward at a time. Token reduction needs the scorer's
    own batching instead: LEFT padding, so every row's scored continuation sits at the end where
    its per-row protect_last can keep it out of the reduction, and reduction-aware reading of the
    log-probs by ORIGINAL position, with a dense fallback for contexts too short to reduce. Both
    are what `utrc_study.eval.scorer` does, and the built-in evaluator and this adapter then give the
    same numbers; reusing HFLM would mean overriding its loglikelihood path anyway.
    """

    def __init__(self, pretrained: Any = "tiny-mamba2", tokenizer: Any = None, batch_size: Any = 16,
                 max_length: int = 1024, device: Optional[str] = None, dtype: Optional[str] = None,
                 protect: Any = True, max_batch_size: Any = None, progress: Any = True, details: Any = False,
                 **kwargs) -> None:
        super().__init__()
        cfg_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in REDUCTION_ARGS}
        if kwargs:
            raise TypeError(f"unknown model_args for --model utrc: {sorted(kwargs)}")
        self.config = config_from_args(**cfg_kwargs)
        device = resolve_lm_device(device)
        self.accelerator = None
        if launched_world_size() > 1:
            device = self._setup_data_parallel(device)
        self._device = device
        if isinstance(pretrained, str):
            from ..hosts.models import load_model

            self.model, self.tokenizer = load_model(pretrained, dtype=dtype, device=device)
            self.model_name = pretrained
        else:  # a model instance (programmatic use); needs tokenizer=
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with a model instance")
            from ..hosts.handle import ensure_unpatched

            ensure_unpatched(pretrained, "--model utrc (UTRCLM)")
            self.model, self.model_name = pretrained, type(pretrained).__name__
            if self.accelerator is not None:
                self.model.to(device)
        if tokenizer is not None and not isinstance(tokenizer, str):
            self.tokenizer = tokenizer
        elif isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.model.eval()
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 16
        self.batch_size_per_gpu = int(batch_size)
        self.max_length = int(max_length)
        self.protect = parse_bool("protect", protect)
        self.progress = parse_bool("progress", progress)   # False: no progress bars (--no-progress)
        self.details = parse_bool("details", details)   # True: keep per-request details (KL / top-1 to dense)
        self.request_details: dict = {}   # (request_type, args) -> RequestDetail, with details=True
        self._last_details: Optional[list] = None
        self.calls = 0
        self.dense_fallback_last_call = 0  # requests of the latest scoring call scored dense (too short)
        self.dense_fallback = 0  # the same, summed over every call of this instance
        self.achieved_cuts: list = []  # token-layer cut each scored request reached (every call)

    # -- data parallel (accelerate launch) ------------------------------------------------------
    def _setup_data_parallel(self, device: str) -> str:
        """Create the Accelerator (one process per device); returns this rank's device."""
        from datetime import timedelta

        import torch
        from accelerate import Accelerator, InitProcessGroupKwargs

        # without a GPU, accelerate only sets up its multi-CPU (gloo) state when asked for the CPU
        acc = Accelerator(cpu=not torch.cuda.is_available(),
                          kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])
        if acc.num_processes <= 1:
            import warnings

            warnings.warn(f"WORLD_SIZE={launched_world_size()} but accelerate set up a single process: "
                          "every process evaluates all documents")
            return device
        self.accelerator = acc
        self._rank = acc.process_index
        self._world_size = acc.num_processes
        if str(device) != "cpu" and str(device) != str(acc.device):
            # each rank owns one device: an explicit --device would put every rank on the same one
            import warnings

            warnings.warn(f"data parallel over {acc.num_processes} processes: using {acc.device} "
                          f"on rank {acc.process_index}, not device={device}")
        return str(acc.device)

    def all_gather(self, tensor):
        if self.world_size <= 1:
            return tensor
        return self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    # -- lm-eval interface ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return ev.eos_id(self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "utrc-tokenizer")).replace("/", "__")

    def _score(self, token_requests, disable_tqdm: bool, desc: str) -> list[tuple[float, bool]]:
        self.calls += 1
        kw: dict = {}
        if self.details:   # dense: its own reference; reduced: a dense forward of each batch beside it
            kw = dict(details=True) if self.config is None else dict(reference=ev.dense_reference(
                self.model, token_requests, self.batch_size_per_gpu, max_length=self.max_length,
                pad_token_id=ev.pad_id(self.tokenizer), budget_bytes=0))
        scores = ev.score_tokens(self.model, token_requests, self.config, self.batch_size_per_gpu,
                                 max_length=self.max_length, pad_token_id=ev.pad_id(self.tokenizer),
                                 progress=self.progress and not disable_tqdm, protect=self.protect, desc=desc, **kw)
        self._last_details = scores.details
        self.dense_fallback_last_call = scores.dense_fallback
        self.dense_fallback += scores.dense_fallback
        self.achieved_cuts.extend(scores.achieved_cut)
        return scores.results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        toks = [ev.encode_pair(self.tokenizer, *req.args) for req in requests]
        res = self._score(toks, disable_tqdm, "utrc loglikelihood")
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        if self.details:
            for req, d in zip(requests, self._last_details):
                self.request_details[("loglikelihood", req.args)] = d
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Rolling windows of max_length tokens (lm-eval's scheme); each window's scored tokens are
        protected, so only the context part of a window (if any) can be reduced."""
        from lm_eval import utils

        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            ids = ev.encode(self.tokenizer, text)
            for ctx, cont in map(utils.make_disjoint_window,
                                 utils.get_rolling_token_windows(token_list=ids, prefix_token=self.eot_token_id,
                                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        res = self._score(windows, disable_tqdm, "utrc loglikelihood_rolling")
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, res):
            out[i] += ll
        for req, v in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, v)
        if self.details:
            parts: dict = {}
            for i, d in zip(owner, self._last_details):
                parts.setdefault(i, []).append(d)
            for i, req in enumerate(requests):
                self.request_details[("loglikelihood_rolling", req.args)] = _summed(parts.get(i, []))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "--model utrc scores log-likelihoods only (the paper's six tasks and the utrc_* tasks); "
            "generation tasks are not supported")

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def reduction_metadata(self) -> dict:
        meta = ev.run_metadata(self.model, self.config, max_length=self.max_length,
                               batch_size=self.batch_size_per_gpu, limit=None, protect=self.protect)
        meta["model"] = self.model_name
        meta["dense_fallback_last_call"] = self.dense_fallback_last_call
        meta["dense_fallback"] = self.dense_fallback  # this process's calls (rank 0 under data parallel)
        cuts = self.achieved_cuts if self.config is not None else []
        # requested ("flops_reduction_token_layer") and achieved token-layer cut side by side
        meta["achieved_token_layer_cut"] = sum(cuts) / len(cuts) if cuts else 0.0
        meta["achieved_token_layer_cut_min"] = min(cuts) if cuts else 0.0
        if self.world_size > 1:
            meta["data_parallel"] = {"world_size": self.world_size, "device_rank0": str(self._device),
                                     "backend": str(self.accelerator.distributed_type)}
        return meta
