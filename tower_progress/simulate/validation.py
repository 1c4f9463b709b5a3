"""``POST /prompt`` validation, producing the exact bodies ComfyUI v0.8.0 answers with.

Mirrors ``execution.validate_prompt``/``validate_inputs``: every output node is validated with
its ancestors; an upstream error is reported once, on the node that has it, with the outputs
that depend on it; a prompt with at least one valid output is accepted and runs only those.
Widget values are converted in place (``"7"`` becomes ``7`` for an INT), as ComfyUI does, so
the graph stored in the queue is the converted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tower_progress.simulate.catalog import MODEL_FILE, NODES, InputSpec, NodeSpec

JsonDict = dict[str, Any]

# What ComfyUI's traceback shows when a link names a node missing from the prompt.
_MISSING_NODE_TRACEBACK = (
    '  File "ComfyUI/execution.py", line 1043, in validate_prompt\n'
    "    m = await validate_inputs(prompt_id, prompt, o, validated)\n"
    "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
    '  File "ComfyUI/execution.py", line 818, in validate_inputs\n'
    "    o_class_type = prompt[o_id]['class_type']\n"
    "                   ~~~~~~^^^^^^\n",
)


@dataclass(frozen=True, slots=True)
class Validation:
    """``ok`` with the outputs to run, or the 400 body parts ``error`` and ``node_errors``."""

    ok: bool
    outputs: tuple[str, ...] = ()
    error: JsonDict | None = None
    node_errors: JsonDict = field(default_factory=dict)


def _error(kind: str, message: str, details: str = "") -> JsonDict:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def validate_prompt(prompt: Any, partial_targets: Sequence[str] | None = None) -> Validation:
    """Validate an API-format graph; ``partial_targets`` limits which output nodes count."""
    if not isinstance(prompt, dict):
        return Validation(
            False, error=_error("invalid_prompt", "Prompt must be a JSON object of nodes.")
        )
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return Validation(
                False,
                error=_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                ),
            )
        spec = NODES.get(node["class_type"])
        if spec is None:
            return Validation(
                False,
                error=_error(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                ),
            )
        if not isinstance(node.get("inputs", {}), dict):
            return Validation(
                False,
                error=_error(
                    "invalid_prompt",
                    "Cannot execute because a node's inputs are not a JSON object.",
                    f"Node ID '#{node_id}'",
                ),
            )
        if spec.output_node and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)
    if not outputs:
        return Validation(False, error=_error("prompt_no_outputs", "Prompt has no outputs"))

    validator = _Validator(prompt)
    good: list[str] = []
    failures: list[tuple[str, list[JsonDict]]] = []
    node_errors: JsonDict = {}
    for output in outputs:
        try:
            valid, reasons = validator.validate(output)
        except (KeyError, IndexError, TypeError, RecursionError) as exc:
            valid = False
            reasons = [_exception_reason(exc)]
            validator.validated[output] = (False, reasons)
        if valid:
            good.append(output)
            continue
        failures.append((output, reasons))
        for node_id, (node_valid, node_reasons) in validator.validated.items():
            if node_valid or not node_reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(output)
    if not good:
        details = "\n".join(
            f"{reason['message']}: {reason['details']}"
            for _, reasons in failures
            for reason in reasons
        )
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details,
            "extra_info": {},
        }
        return Validation(False, error=error, node_errors=node_errors)
    return Validation(True, outputs=tuple(good), node_errors=node_errors)


def _exception_reason(exc: BaseException) -> JsonDict:
    traceback = list(_MISSING_NODE_TRACEBACK) if isinstance(exc, KeyError) else []
    return {
        "type": "exception_during_validation",
        "message": "Exception when validating node",
        "details": str(exc),
        "extra_info": {"exception_type": type(exc).__name__, "traceback": traceback},
    }


class _Validator:
    """Depth-first validation with ComfyUI's memo: node id -> (valid, its own errors)."""

    def __init__(self, prompt: JsonDict) -> None:
        self._prompt = prompt
        self.validated: dict[str, tuple[bool, list[JsonDict]]] = {}
        self._visiting: set[str] = set()

    def validate(self, node_id: str) -> tuple[bool, list[JsonDict]]:
        done = self.validated.get(node_id)
        if done is not None:
            return done
        if node_id in self._visiting:
            raise RecursionError("maximum recursion depth exceeded")
        self._visiting.add(node_id)
        try:
            result = self._validate_node(node_id)
        finally:
            self._visiting.discard(node_id)
        self.validated[node_id] = result
        return result

    def _validate_node(self, node_id: str) -> tuple[bool, list[JsonDict]]:
        node = self._prompt[node_id]
        spec = NODES[node["class_type"]]
        inputs: JsonDict = node.setdefault("inputs", {})
        errors: list[JsonDict] = []
        valid = True
        for declared in spec.inputs:
            if declared.name not in inputs:
                if declared.required:
                    errors.append(_missing(declared.name))
                continue
            value = inputs[declared.name]
            if isinstance(value, list):
                linked_ok = self._validate_link(declared, value, errors)
                valid = valid and linked_ok
                continue
            if isinstance(value, dict) and "__value__" in value:
                value = inputs[declared.name] = value["__value__"]
            error = _check_widget(declared, value, inputs)
            if error is not None:
                errors.append(error)
        return (valid and not errors, errors)

    def _validate_link(self, declared: InputSpec, link: list[Any], errors: list[JsonDict]) -> bool:
        """Check one link; returns False when the linked node is itself invalid."""
        if len(link) != 2:
            errors.append(
                {
                    "type": "bad_linked_input",
                    "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    "details": declared.name,
                    "extra_info": {
                        "input_name": declared.name,
                        "input_config": declared.config(),
                        "received_value": link,
                    },
                }
            )
            return True
        source_id, slot = link
        source: NodeSpec = NODES[self._prompt[source_id]["class_type"]]
        received = source.outputs[slot]
        expected = "COMBO" if isinstance(declared.type, tuple) else declared.type
        if received not in (expected, "*") and expected != "*":
            errors.append(
                {
                    "type": "return_type_mismatch",
                    "message": "Return type mismatch between linked nodes",
                    "details": f"{declared.name}, received_type({received}) mismatch "
                    f"input_type({expected})",
                    "extra_info": {
                        "input_name": declared.name,
                        "input_config": declared.config(),
                        "received_type": received,
                        "linked_node": link,
                    },
                }
            )
            return True
        try:
            linked_valid, _ = self.validate(source_id)
        except (KeyError, IndexError, TypeError) as exc:
            self.validated[source_id] = (
                False,
                [
                    {
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(exc),
                        "extra_info": {
                            "input_name": declared.name,
                            "input_config": declared.config(),
                            "exception_message": str(exc),
                            "exception_type": type(exc).__name__,
                            "traceback": [],
                            "linked_node": link,
                        },
                    }
                ],
            )
            return False
        return linked_valid


def _missing(name: str) -> JsonDict:
    return {
        "type": "required_input_missing",
        "message": "Required input is missing",
        "details": name,
        "extra_info": {"input_name": name},
    }


def _check_widget(declared: InputSpec, value: Any, inputs: JsonDict) -> JsonDict | None:
    """Convert a widget value in place and check its range or list; return the error, if any."""
    name = declared.name
    try:
        if declared.type == "INT":
            value = int(value)
        elif declared.type == "FLOAT":
            value = float(value)
        elif declared.type in ("STRING", MODEL_FILE):
            value = str(value)
        elif declared.type == "BOOLEAN":
            value = bool(value)
    except (TypeError, ValueError) as exc:
        return {
            "type": "invalid_input_type",
            "message": f"Failed to convert an input {name} value to a {declared.type} value",
            "details": f"{name}, {value}, {exc}",
            "extra_info": {
                "input_name": name,
                "input_config": declared.config(),
                "received_value": value,
                "exception_message": str(exc),
            },
        }
    inputs[name] = value
    options = declared.options
    if "min" in options and value < options["min"]:
        return _range_error("value_smaller_than_min", "smaller than min", "min", declared, value)
    if "max" in options and value > options["max"]:
        return _range_error("value_bigger_than_max", "bigger than max", "max", declared, value)
    if isinstance(declared.type, tuple) and value not in declared.type:
        choices = list(declared.type)
        long_list = len(choices) > 20
        listing = f"(list of length {len(choices)})" if long_list else str(choices)
        return {
            "type": "value_not_in_list",
            "message": "Value not in list",
            "details": f"{name}: '{value}' not in {listing}",
            "extra_info": {
                "input_name": name,
                "input_config": None if long_list else declared.config(),
                "received_value": value,
            },
        }
    return None


def _range_error(kind: str, words: str, bound: str, declared: InputSpec, value: Any) -> JsonDict:
    return {
        "type": kind,
        "message": f"Value {value} {words} of {declared.options[bound]}",
        "details": declared.name,
        "extra_info": {
            "input_name": declared.name,
            "input_config": declared.config(),
            "received_value": value,
        },
    }
