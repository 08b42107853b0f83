"""TaskFlow decorators: ``@task.llm_deferred`` and ``@task.llm_fanout``.

The decorated function runs on a worker and returns what to ask (a prompt, or messages; for a fan-out,
a list of them); the call then waits in the triggerer exactly as :class:`LLMOperator` (or
:class:`LLMFanOutOperator`) makes it, with every argument of that operator, and the task returns the
answer (with ``output_type``: the parsed document). The names differ from every decorator of the
``common.ai`` provider (``@task.llm``, ``@task.llm_batch``, ...), so both providers can be installed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar

from airflow.sdk import Context
from airflow.sdk.bases.decorator import (
    DecoratedOperator,
    TaskDecorator,
    determine_kwargs,
    task_decorator_factory,
)
from airflow.sdk.definitions._internal.types import SET_DURING_EXECUTION
from airflow.sdk.definitions.context import context_merge
from airflow.sdk.exceptions import AirflowFailException

from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator


class _DecoratedLLMCall(DecoratedOperator):
    """What both decorators share: the function runs on the worker, then the call is deferred."""

    # The function's arguments, and the system prompt; what the function returns is not a template.
    template_fields: Sequence[str] = (*DecoratedOperator.template_fields, "system_prompt")
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        "system_prompt": "md",
    }

    custom_operator_name: str
    _operator: str  # the operator to use instead in worker-free mode
    _asks_for: str  # what the function must return, for the error message

    def __init__(
        self,
        *,
        python_callable: Callable,
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The function needs a worker: the worker-free mode (start in the triggerer) cannot run it.
        if kwargs.get("start_from_trigger"):
            raise ValueError(
                f"{self.custom_operator_name} {kwargs.get('task_id')!r}: start_from_trigger=True cannot run "
                f"the decorated function (it needs a worker); for a worker-free task use {self._operator} "
                f"with a templated prompt."
            )
        kwargs["start_from_trigger"] = False
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)

    def execute(self, context: Context) -> Any:
        context_merge(context, self.op_kwargs)
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        self.set_question(self.python_callable(*self.op_args, **kwargs))
        # Not rendered again: what the function returned is data, and Jinja in it stays text.
        return super().execute(context)

    def set_question(self, returned: Any) -> None:
        raise NotImplementedError

    def bad_return(self, returned: Any) -> AirflowFailException:
        return AirflowFailException(
            f"{self.custom_operator_name} {self.task_id!r}: the decorated function must return "
            f"{self._asks_for}, got {type(returned).__name__}: {returned!r:.200}"
        )


class _LLMDeferredOperator(_DecoratedLLMCall, LLMOperator):
    custom_operator_name = "@task.llm_deferred"
    _operator = "LLMOperator"
    _asks_for = "the prompt (a str) or the messages (a list of role/content dicts)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(prompt=SET_DURING_EXECUTION, **kwargs)

    def set_question(self, returned: Any) -> None:
        if isinstance(returned, str):
            self.prompt, self.messages = returned, None
        elif isinstance(returned, list) and all(isinstance(m, dict) for m in returned):
            self.prompt, self.messages = None, returned
        else:
            raise self.bad_return(returned)


class _LLMFanOutDecoratedOperator(_DecoratedLLMCall, LLMFanOutOperator):
    custom_operator_name = "@task.llm_fanout"
    _operator = "LLMFanOutOperator"
    _asks_for = "a list of items, each a prompt (a str) or a message list"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(prompts=SET_DURING_EXECUTION, **kwargs)

    def _validate_input(self, where: str) -> None:
        if self.prompts is not SET_DURING_EXECUTION:
            super()._validate_input(where)

    def set_question(self, returned: Any) -> None:
        if not isinstance(returned, list | tuple):
            raise self.bad_return(returned)
        self.prompts = list(returned)


def llm_deferred_task(python_callable: Callable | None = None, **kwargs: Any) -> TaskDecorator:
    """
    ``@task.llm_deferred``: the function returns the prompt (or messages); the call waits in the triggerer.

    Takes every argument of :class:`~airflow_llm_async.operators.llm.LLMOperator` (``model``,
    ``fallback_models``, ``llm_conn_id``, ``system_prompt``, ``quality``, ``output_type``, ``cache_ttl``,
    ``circuit_open``, ...)::

        @task.llm_deferred(model="gpt-4o-mini", system_prompt="Summarize in one sentence.")
        def summarize(article: str) -> str:
            return f"Summarize: {article}"

        summaries = summarize.expand(article=articles)  # each call waits in the triggerer

    The task returns the answer (``output_type``: the parsed JSON document); ``llm_meta`` holds its details.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_LLMDeferredOperator,
        multiple_outputs=False,  # the answer is one value, even when output_type makes it a dict
        **kwargs,
    )


def llm_fanout_task(python_callable: Callable | None = None, **kwargs: Any) -> TaskDecorator:
    """
    ``@task.llm_fanout``: the function returns a list of prompts; all are asked in one deferred task.

    Takes every argument of :class:`~airflow_llm_async.operators.fanout.LLMFanOutOperator` (``max_failures``,
    ``model``, ``quality``, ``output_type``, ``cache_ttl``, ``circuit_open``, ...) but
    ``start_from_trigger``. The task returns the answers in input order, ``None`` for a failed item.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_LLMFanOutDecoratedOperator,
        multiple_outputs=False,
        **kwargs,
    )
