"""lm-eval harness tasks on a loaded model, through lm-eval's Python API (`simple_evaluate` with
an `HFLM` around the model), so a fake-quantized or packed model is scored as distill computes it
and a plain model directory scores as `lm_eval --model hf` does."""

from __future__ import annotations

import logging
from functools import lru_cache

from distill.config import LmEvalSpec
from distill.errors import RecipeError
from distill.tasks import TASKS_DIR


def lm_eval_scores(model, tokenizer, spec: LmEvalSpec, max_length: int, device) -> dict:
    """`<task>/<metric>` -> score for every task of `spec` (stderr entries left out)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise RecipeError(
            f"eval.lm_eval needs the lm-eval package ({err}); pip install 'lm-eval>=0.4.13'"
        ) from None
    logging.getLogger("lm-eval").setLevel(logging.WARNING)  # per-task notices drown the run log
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=spec.batch_size,
        max_length=max_length,
        device=str(device),
    )
    manager = _task_manager(tuple(spec.include_path), tuple(spec.tasks))
    missing = [t for t in spec.tasks if t not in manager.all_tasks]
    if missing:
        raise RecipeError(
            f"eval.lm_eval.tasks: {missing} not found in lm-eval's tasks nor in "
            f"eval.lm_eval.include_path ({[str(TASKS_DIR), *spec.include_path]}); a local task is "
            "a YAML in one of those folders (its `task:` is the name)"
        )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=manager,
        bootstrap_iters=0,  # stderr only; the scores are the same without resampling
        log_samples=False,
    )
    scores = {}  # "acc,none" -> "<task>/acc": the gates' and the README's key
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, has_filter, _ = key.partition(",")  # "acc,none": metric name, filter
            if has_filter and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                scores[f"{task}/{metric}"] = float(value)
    return scores


@lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], tasks: tuple[str, ...]):
    """lm-eval's task index: the local folders alone when they hold every task (indexing lm-eval's
    own few thousand YAMLs takes half a minute on a busy CPU), else with lm-eval's tasks too."""
    from lm_eval.tasks import TaskManager

    folders = [str(TASKS_DIR), *include_path]
    local = TaskManager(include_path=folders, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    return TaskManager(include_path=folders)
