"""A transformers pipeline that reduces a context once and answers several questions from its state.

Registered with transformers' PIPELINE_REGISTRY as "utrc-text-generation" (compare NVIDIA kvpress's
"kv-press-text-generation", which compresses a context's KV cache once for several questions; here
the state is the SSM's fixed-size state after a reduced prefill, utrc_lib/hosts/generation.py):

    from transformers import pipeline
    pipe = pipeline("utrc-text-generation", model=model, tokenizer=tok)
    pipe(context, question="Who?", config=cfg)["answer"]
    pipe(context, questions=["Who?", "Where?"], config=cfg)["answers"]

`import utrc_lib` does not import transformers' pipelines (about 2 s): it registers the task the moment
`transformers.pipelines` is first imported (a one-shot import hook, `register_when_imported`), or at
once when it already is; `register()` does it explicitly.

Greedy answers; `max_new_tokens` (default 32) per question; generation of a row stops at the
tokenizer's EOS. Questions are not reduced; the context is (the `config`, or the model's own patch
when it is patched, or nothing: a dense prefill).
"""
from __future__ import annotations

import sys

import torch

TASK = "utrc-text-generation"

_CLASS = None


def pipeline_class() -> type:
    """The Pipeline subclass (built on first use: importing transformers' pipelines takes seconds)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from transformers import Pipeline

    class UTRCTextGenerationPipeline(Pipeline):
        """context (str) + question / questions (str or list of str) -> {"answer": str} / {"answers": [str]}.

        Call parameters: question, questions, config (a utrc_lib.ReductionConfig; None: dense, or the
        model's patch), max_new_tokens (32), answer_prefix (text put after each question, default "").
        """

        def _sanitize_parameters(self, question=None, questions=None, config=None, max_new_tokens=None,
                                 answer_prefix=None, **kwargs):
            if kwargs:
                raise TypeError(f"{TASK}: unknown argument(s) {sorted(kwargs)}; valid: question, questions, config, "
                                f"max_new_tokens, answer_prefix")
            if question is not None and questions is not None:
                raise ValueError(f"{TASK}: give question or questions, not both")
            if questions is not None and (isinstance(questions, str) or not all(isinstance(q, str) for q in questions)):
                raise TypeError(f"{TASK}: questions must be a list of strings")
            if question is not None and not isinstance(question, str):
                raise TypeError(f"{TASK}: question must be a string, got {type(question).__name__}")
            pre = {"questions": [question] if question is not None else list(questions or [""]),
                   "answer_prefix": answer_prefix or "", "single": questions is None}
            fwd = {"config": config}
            if max_new_tokens is not None:
                fwd["max_new_tokens"] = max_new_tokens
            return pre, fwd, {"single": questions is None}

        def preprocess(self, context, questions=(), answer_prefix="", single=True):
            if not isinstance(context, str) or not context:
                raise ValueError(f"{TASK}: the context must be a non-empty string")
            tok = self.tokenizer
            ctx = tok(context, return_tensors="pt", add_special_tokens=True).input_ids
            qs = [tok(q + answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids if (q + answer_prefix)
                  else None for q in questions]
            return {"context_ids": ctx, "question_ids": qs}

        def _forward(self, inputs, config=None, max_new_tokens=32):
            from .generation import generate_from, prefill

            state = prefill(self.model, inputs["context_ids"], config)
            eos = self.tokenizer.eos_token_id
            answers = [generate_from(self.model, state, q, max_new_tokens=max_new_tokens, eos_token_id=eos)
                       for q in inputs["question_ids"]]
            return {"answers": answers, "achieved_cut": state.achieved_cut}

        def postprocess(self, outputs, single=True):
            texts = [self.tokenizer.decode(a[0], skip_special_tokens=True) for a in outputs["answers"]]
            return {"answer": texts[0]} if single else {"answers": texts}

        # the state is built and used inside _forward: no padding / batching of the pipeline's own
        def forward(self, model_inputs, **forward_params):
            with torch.inference_mode():
                return self._forward(model_inputs, **forward_params)

    _CLASS = UTRCTextGenerationPipeline
    return _CLASS


def __getattr__(name):
    if name == "UTRCTextGenerationPipeline":
        return pipeline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the task with transformers (idempotent)."""
    from transformers import AutoModelForCausalLM
    from transformers.pipelines import PIPELINE_REGISTRY

    cls = pipeline_class()
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is cls:
        return
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=cls, pt_model=AutoModelForCausalLM)


class _RegisterAfterImport:
    """One-shot import hook (a sys.meta_path finder): when `transformers.pipelines` is imported,
    register the task right after it has executed."""

    name = "transformers.pipelines"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        try:
            sys.meta_path.remove(self)  # find the real spec without us; then we are done
        except ValueError:
            pass
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                register()
            except Exception as exc:  # never break the user's import
                import warnings

                warnings.warn(f"utrc: could not register the {TASK!r} pipeline: {exc}")

        loader.exec_module = exec_and_register
        return spec


def register_when_imported() -> None:
    """Register now if transformers' pipelines are already imported, else when they are (cheap)."""
    if "transformers.pipelines" in sys.modules:
        register()
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())

