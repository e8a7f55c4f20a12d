"""python kserve_check.py FILE...: check KServe objects against the API types KServe's own SDK
(PyPI `kserve`) generates from its CRDs, down to Kubernetes' own types (the `kubernetes`
client's): no field the types do not have, each value of its type, required fields present,
enumerations respected (the models' own setters). Runs in the SDK's virtualenv (scripts/setup
makes it: the SDK's pins conflict with vLLM's)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import kserve.models
import kubernetes.client.models
import yaml

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "bytes": (str,),
    "ResourceQuantity": (str, int, float),  # "16Gi", 4
}
KINDS = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}


def _class(name: str) -> Any:
    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no API type {name}")


def check(value: Any, type_: str, path: str, errors: list[str]) -> None:
    # the two generators' spellings: list[X] and List[X], dict(str, X) and Dict[str, X]
    if type_.startswith("List["):
        type_ = f"list[{type_[5:-1]}]"
    elif type_.startswith("Dict["):
        type_ = f"dict({type_[5:-1]})"
    if type_ == "object":  # int-or-string and free-form fields
        return
    if type_.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: a list of {type_[5:-1]}, got {value!r}")
            return
        for i, item in enumerate(value):
            check(item, type_[5:-1], f"{path}[{i}]", errors)
    elif type_.startswith("dict("):
        inner = type_[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            errors.append(f"{path}: a map of {inner}, got {value!r}")
            return
        for key, item in value.items():
            check(item, inner, f"{path}.{key}", errors)
    elif type_ in PRIMITIVES:
        wanted = PRIMITIVES[type_]
        if not isinstance(value, wanted) or (type_ != "bool" and isinstance(value, bool)):
            errors.append(f"{path}: {type_}, got {value!r}")
    else:
        _check_object(value, _class(type_), path, errors)


def _check_object(value: Any, klass: Any, path: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path}: a {klass.__name__} object, got {value!r}")
        return
    attributes = {json: attr for attr, json in klass.attribute_map.items()}
    for key, item in value.items():
        if key not in attributes:
            errors.append(f"{path}.{key}: not a field of {klass.__name__}")
        else:
            check(item, klass.openapi_types[attributes[key]], f"{path}.{key}", errors)
    try:  # the generated setters: required fields and enumerations
        klass(**{attributes[k]: v for k, v in value.items() if k in attributes})
    except (ValueError, TypeError) as exc:
        errors.append(f"{path}: {exc}")


def main(files: list[str]) -> int:
    errors: list[str] = []
    for file in files:
        for doc in yaml.safe_load_all(Path(file).read_text()):
            if doc:
                kind = doc.get("kind")
                if kind not in KINDS:
                    errors.append(f"{file}: kind {kind!r} is not one of {', '.join(KINDS)}")
                    continue
                _check_object(doc, _class(KINDS[kind]), f"{file}: {kind}", errors)
    print("\n".join(errors) or "ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
